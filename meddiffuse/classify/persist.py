"""Saving classifiers to, and loading them from, the object store (or a registry ``models:/`` ref).

Layout under a prefix: ``model.safetensors`` (state dict), then ``classifier.json`` (metadata, the
weights' SHA-256 and free-form ``info``) written last as the commit point, like a Dataset's manifest.
"""

from __future__ import annotations

import json
from typing import Any

import safetensors.torch
import timm

from meddiffuse.classify.classifier import Classifier
from meddiffuse.config import Settings
from meddiffuse.store.base import CorruptObject, ObjectNotFound, ObjectStore, sha256_hex

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "classifier.json"


class ClassifierNotFound(FileNotFoundError):
    """No committed classifier (no ``classifier.json``) at the prefix."""


def save_classifier(
    clf: Classifier, store: ObjectStore, prefix: str, info: dict[str, Any] | None = None
) -> str:
    """Write weights then metadata under ``prefix``; ``info`` (JSON-able) rides along, e.g. metrics."""
    prefix = prefix.rstrip("/")
    store.delete(f"{prefix}/{METADATA_FILE}")  # withdraw first: a crash leaves nothing half-visible
    # clone: safetensors refuses tensors that share storage
    state = {k: v.detach().cpu().clone().contiguous() for k, v in clf.model.state_dict().items()}
    data = safetensors.torch.save(state)
    store.put(f"{prefix}/{WEIGHTS_FILE}", data)
    metadata = clf.metadata() | {
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_hex(data),
        "info": info or {},
    }
    store.put_text(f"{prefix}/{METADATA_FILE}", json.dumps(metadata, indent=2, sort_keys=True))
    return prefix


def read_classifier_metadata(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """The committed metadata at ``prefix`` (ClassifierNotFound if there is none)."""
    prefix = prefix.rstrip("/")
    try:
        return json.loads(store.get_text(f"{prefix}/{METADATA_FILE}"))
    except ObjectNotFound:
        raise ClassifierNotFound(
            f"no classifier at {prefix!r} in {store.uri} (no {METADATA_FILE}: never saved, or its "
            "writer was interrupted)"
        ) from None


def load_classifier(
    ref: str, store: ObjectStore | None = None, settings: Settings | None = None
) -> Classifier:
    """A classifier from a store prefix, or from the registry for ``models:/...`` / ``name@alias`` refs."""
    from meddiffuse.registry.refs import is_registry_ref

    if is_registry_ref(ref):
        from meddiffuse.classify.registry import load_registered_classifier

        return load_registered_classifier(ref, settings)
    if store is None:
        from meddiffuse.store import create_store

        store = create_store(settings)
    clf = load_classifier_from_store(store, ref)
    if settings is not None:
        clf.to(settings.torch_device())
    clf.model.eval()
    return clf


def load_classifier_from_store(store: ObjectStore, prefix: str) -> Classifier:
    """The committed classifier at ``prefix`` (weights checked against their recorded SHA-256)."""
    prefix = prefix.rstrip("/")
    metadata = read_classifier_metadata(store, prefix)
    data = store.get(f"{prefix}/{metadata.get('weights_file', WEIGHTS_FILE)}")
    if metadata.get("weights_sha256") and sha256_hex(data) != metadata["weights_sha256"]:
        raise CorruptObject(f"weights of classifier {prefix!r} do not match their recorded SHA-256")
    model = timm.create_model(
        metadata["arch"], pretrained=False, num_classes=len(metadata["classes"]), in_chans=metadata["in_chans"]
    )
    model.load_state_dict(safetensors.torch.load(data), strict=True)
    model.eval()
    return Classifier.from_module(model, metadata)
