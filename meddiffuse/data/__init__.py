"""Datasets: the manifest contract, ingestion of image folders, phantoms, torch loaders."""

from meddiffuse.data.dataset import (
    Dataset,
    DatasetNotFound,
    DatasetWriter,
    Entry,
    Manifest,
    Origin,
    dataset_exists,
    list_datasets,
    open_dataset,
)

__all__ = [
    "Dataset",
    "DatasetNotFound",
    "DatasetWriter",
    "Entry",
    "Manifest",
    "Origin",
    "dataset_exists",
    "list_datasets",
    "open_dataset",
]
