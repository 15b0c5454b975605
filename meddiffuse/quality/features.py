"""Feature spaces for the audit: a ``FeatureExtractor`` maps N x H x W x C uint8 images to N x D floats.

The metrics never see a model, only arrays; this module builds the extractors (ImageNet
EfficientNet-Lite, a domain classifier trained on the real training split, local weights, or cheap
downsampled pixels) and runs them in batches with a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from meddiffuse.domains import Domain

if TYPE_CHECKING:
    from meddiffuse.config import Settings
    from meddiffuse.data.dataset import Dataset

FeatureExtractor = Callable[[np.ndarray], np.ndarray]

IMAGENET = "imagenet"
DOMAIN = "domain"
THUMBNAILS = "thumbnails"
LOCAL = "local"


def domain_of(dataset: Dataset) -> Domain:
    """The dataset's registered domain, or one rebuilt from its manifest (custom ImageFolder domains)."""
    return dataset.domain


def extract_features(
    extractor: FeatureExtractor,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "features",
) -> np.ndarray:
    """``extractor`` over ``images`` in batches -> float64 (N x D); checks what the extractor returns."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"images must be N x H x W x C uint8, got {arr.dtype} {arr.shape}")
    parts = []
    for start in tqdm(range(0, len(arr), batch_size), desc=desc, disable=not progress, leave=False):
        batch = arr[start : start + batch_size]
        out = np.asarray(extractor(batch), dtype=np.float64)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ValueError(
                f"feature extractor {desc!r} returned shape {out.shape} for {len(batch)} images; "
                "expected (N, D)"
            )
        parts.append(out)
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def downsampled_pixels(size: int = 16) -> FeatureExtractor:
    """Area-averaged size x size thumbnails, flattened, in [0, 1]: a model-free feature space.

    Cheap and deterministic; good for smoke tests and as a sanity baseline, blind to semantics.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")

    def extract(images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return F.adaptive_avg_pool2d(x, size).flatten(1).numpy()

    return extract


def classifier_extractor(classifier: Any) -> FeatureExtractor:
    """Pooled pre-logit features of a ``meddiffuse.classify`` Classifier."""
    features = getattr(classifier, "features", None)
    if not callable(features):
        raise TypeError(f"{type(classifier).__name__} has no features(images) method")
    return features


def imagenet_extractor() -> FeatureExtractor:
    """Pooled features (1280-D) of EfficientNet-Lite0 with its bundled offline ImageNet weights."""
    from meddiffuse.classify.factory import imagenet_feature_extractor

    return classifier_extractor(imagenet_feature_extractor())


def local_weights_extractor(weights: str | Path, arch: str) -> FeatureExtractor:
    """Pooled features of a timm architecture loaded from a local weights file (no download)."""
    from meddiffuse.classify.factory import create_classifier

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"feature weights {path} do not exist")
    # the head is irrelevant (only pooled pre-logit features are used) and RGB keeps the file's stem
    # as trained; the classifier's preprocessing turns grayscale images into RGB
    clf = create_classifier(arch, 2, 3, weights=str(path))
    if clf.pretrained_source is None:
        raise ValueError(f"{path} was not loaded as weights for {arch}")
    clf.model.eval()
    return classifier_extractor(clf)


def domain_extractor(
    real: Dataset, *, epochs: int = 5, seed: int = 0, arch: str | None = None, progress: bool = False
) -> FeatureExtractor:
    """Features of a classifier trained now on ``real``'s training split (what separates its classes)."""
    from meddiffuse.classify.architectures import DEFAULT_ARCH
    from meddiffuse.classify.factory import create_classifier
    from meddiffuse.classify.train import train_classifier

    m = real.manifest
    clf = create_classifier(arch or DEFAULT_ARCH, len(m.classes), m.channels, classes=m.classes,
                            channels=m.channels, seed=seed)
    train_classifier(clf, [(real, "train")], domain=domain_of(real), epochs=epochs, seed=seed,
                     progress=progress)
    clf.model.eval()
    return classifier_extractor(clf)


def registered_classifier_extractor(ref: str, settings: Settings | None = None) -> FeatureExtractor:
    """Features of a stored or registered classifier (``models:/...`` or a store reference)."""
    from meddiffuse.classify.classifier import load_classifier
    from meddiffuse.config import Settings
    from meddiffuse.store import create_store

    settings = settings or Settings()
    return classifier_extractor(load_classifier(ref, create_store(settings), settings))


def build_extractors(
    names: list[str] | tuple[str, ...],
    real: Dataset,
    *,
    classifier: str | None = None,
    epochs: int = 5,
    weights: str | Path | None = None,
    arch: str = "efficientnet_lite0",
    seed: int = 0,
    progress: bool = False,
    settings: Settings | None = None,
) -> dict[str, FeatureExtractor]:
    """Feature extractors by name.

    ``imagenet``: EfficientNet-Lite0 ImageNet features; ``domain``: the ``classifier`` reference if
    given, else a classifier trained on ``real``'s train split for ``epochs``; ``thumbnails``: 16 px
    downsampled pixels. ``weights`` adds ``local``: ``arch`` loaded from that file.
    """
    unknown = sorted(set(names) - {IMAGENET, DOMAIN, THUMBNAILS})
    if unknown:
        raise ValueError(f"unknown feature space(s) {unknown}; choose from {[IMAGENET, DOMAIN, THUMBNAILS]}")
    out: dict[str, FeatureExtractor] = {}
    for name in dict.fromkeys(names):  # ordered, without repeats
        if name == IMAGENET:
            out[name] = imagenet_extractor()
        elif name == DOMAIN:
            out[name] = (
                registered_classifier_extractor(classifier, settings)
                if classifier
                else domain_extractor(real, epochs=epochs, seed=seed, progress=progress)
            )
        else:
            out[name] = downsampled_pixels(16)
    if weights is not None:
        out[LOCAL] = local_weights_extractor(weights, arch)
    return out


def default_extractors(
    real: Dataset, *, seed: int = 0, progress: bool = False, settings: Settings | None = None
) -> dict[str, FeatureExtractor]:
    """ImageNet features plus domain features from a classifier trained on ``real``'s train split now."""
    return build_extractors((IMAGENET, DOMAIN), real, seed=seed, progress=progress, settings=settings)


__all__ = [
    "DOMAIN",
    "IMAGENET",
    "LOCAL",
    "THUMBNAILS",
    "FeatureExtractor",
    "build_extractors",
    "classifier_extractor",
    "default_extractors",
    "domain_of",
    "domain_extractor",
    "downsampled_pixels",
    "extract_features",
    "imagenet_extractor",
    "local_weights_extractor",
    "registered_classifier_extractor",
]
