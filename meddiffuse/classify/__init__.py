"""Classifiers: timm CNNs with offline pretrained weights, training, and test-set evaluation.

``create_classifier(arch, num_classes, in_chans)`` is the one entry point; ``ARCH_PRESETS`` names the
study's groups of architectures (see ``meddiffuse.classify.architectures`` for why these eight).
"""

from meddiffuse.classify.architectures import (
    ARCH_PRESETS,
    DEFAULT_ARCH,
    UnknownArchitectureError,
    list_architectures,
    resolve_architectures,
)
from meddiffuse.classify.classifier import Classifier
from meddiffuse.classify.factory import PRETRAINED_INPUT_SIZE, create_classifier, imagenet_feature_extractor
from meddiffuse.classify.metrics import ClassMetrics, EvalResult, compute_metrics, evaluate
from meddiffuse.classify.persist import (
    ClassifierNotFound,
    load_classifier,
    read_classifier_metadata,
    save_classifier,
)
from meddiffuse.classify.train import EpochStats, SourceInfo, TrainResult, split_train_val, train_classifier
from meddiffuse.classify.weights import WeightsError, convert_lukemelas_to_timm, resolve_weights

__all__ = [
    "ARCH_PRESETS",
    "DEFAULT_ARCH",
    "PRETRAINED_INPUT_SIZE",
    "ClassMetrics",
    "Classifier",
    "ClassifierNotFound",
    "EpochStats",
    "EvalResult",
    "SourceInfo",
    "TrainResult",
    "UnknownArchitectureError",
    "WeightsError",
    "compute_metrics",
    "convert_lukemelas_to_timm",
    "create_classifier",
    "evaluate",
    "imagenet_feature_extractor",
    "list_architectures",
    "load_classifier",
    "read_classifier_metadata",
    "resolve_architectures",
    "resolve_weights",
    "save_classifier",
    "split_train_val",
    "train_classifier",
]
