"""Classifiers: timm CNNs with offline pretrained weights, training, and test-set evaluation.

``create_classifier(arch, num_classes, in_chans)`` is the one entry point; ``ARCH_PRESETS`` names the
study's groups of architectures (see ``meddiffuse.classify.architectures`` for why these eight).
Names are imported on first use (PEP 562): the presets and the registry commands need no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "meddiffuse.classify.architectures": ("ARCH_PRESETS", "DEFAULT_ARCH", "UnknownArchitectureError",
                                          "list_architectures", "resolve_architectures"),
    "meddiffuse.classify.classifier": ("Classifier",),
    "meddiffuse.classify.factory": ("PRETRAINED_INPUT_SIZE", "create_classifier", "imagenet_feature_extractor"),
    "meddiffuse.classify.metrics": ("ClassMetrics", "EvalResult", "PairedComparison", "compute_metrics",
                                    "evaluate", "paired_bootstrap"),
    "meddiffuse.classify.persist": ("ClassifierNotFound", "load_classifier", "read_classifier_metadata",
                                    "save_classifier"),
    "meddiffuse.classify.train": ("EpochStats", "SourceInfo", "TrainResult", "split_train_val", "train_classifier"),
    "meddiffuse.classify.weights": ("WeightsError", "convert_lukemelas_to_timm", "resolve_weights"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
