"""``Classifier``: a timm model plus everything needed to feed it images and name its outputs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddiffuse.data.loader import match_channels

METADATA_VERSION = 1
ImageBatch = np.ndarray | torch.Tensor


class Classifier:
    """A timm image classifier with its preprocessing and class names.

    ``preprocess`` is the single path from images to model input, used by training and inference
    alike: channels are matched to ``in_chans`` (gray <-> RGB), images are resized to ``input_size``
    (None keeps their own size) and normalised with ``mean``/``std``.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: str,
        classes: Sequence[str],
        *,
        channels: int,
        in_chans: int,
        input_size: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        pretrained_source: str | None,
        resolution: int | None = None,
    ) -> None:
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"model has {num_classes} outputs but {len(classes)} class names were given")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
        self.model = model
        self.arch = arch
        self.classes = list(classes)
        self.channels = channels
        self.in_chans = in_chans
        self.input_size = input_size
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.pretrained_source = pretrained_source
        # the square side of the dataset images it was trained on: an upload is centre-cropped and
        # resized to this before ``preprocess`` (exactly what ingest did to the training images)
        self.resolution = resolution
        self.registered: Any = None  # the PinnedVersion it was loaded from, when it came from the registry
        self._frozen: tuple[tuple, Any] | None = None  # (weights key, TorchScript snapshot)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_module(cls, model: nn.Module, metadata: dict[str, Any]) -> Classifier:
        """Wrap an already-built model (e.g. from the MLflow registry) described by ``metadata()``."""
        missing = {"arch", "classes", "in_chans", "mean", "std"} - set(metadata)
        if missing:
            raise ValueError(f"classifier metadata lacks {sorted(missing)}")
        return cls(
            model,
            metadata["arch"],
            metadata["classes"],
            channels=int(metadata.get("channels", metadata["in_chans"])),
            in_chans=int(metadata["in_chans"]),
            input_size=metadata.get("input_size"),
            mean=metadata["mean"],
            std=metadata["std"],
            pretrained_source=metadata.get("pretrained_source"),
            resolution=metadata.get("resolution"),
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-able description; ``from_module(model, metadata)`` rebuilds the classifier."""
        return {
            "metadata_version": METADATA_VERSION,
            "arch": self.arch,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "in_chans": self.in_chans,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pretrained_source": self.pretrained_source,
            # the input contract an upload must meet: decoded, converted to `channels`, centre-cropped
            # to a square, resized to `resolution` (bicubic), then `preprocess` (input_size, mean/std)
            "resolution": self.resolution,
            "crop": "centre-square",
        }

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def pretrained(self) -> bool:
        return self.pretrained_source is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Classifier:
        self.model.to(device)
        return self

    # --- images -> tensors --------------------------------------------------------------------
    def preprocess(self, images: ImageBatch) -> torch.Tensor:
        """NHWC uint8 / float [0,1] arrays, or NCHW float [0,1] tensors -> normalised model input."""
        x = _to_nchw_unit(images).to(self.device)
        x = match_channels(x, self.in_chans)
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    # --- inference ----------------------------------------------------------------------------
    def _batches(self, images: ImageBatch, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model.eval()
        for start in range(0, len(images), batch_size):
            yield self.preprocess(images[start : start + batch_size])

    def optimize_for_inference(self) -> Classifier:
        """Serve ``predict_proba`` from a frozen TorchScript snapshot of the current weights (CPU only).

        Freezing folds batch norm into the convolutions and pre-packs weights for oneDNN: about 3x
        faster for EfficientNet-Lite0 on CPU, outputs equal to ~1e-4. The snapshot is keyed by the
        weights' identity and in-place version counters, so it is dropped as soon as any weight changes
        (training, ``load_state_dict``, ``.to()``) and a stale copy is never used. Where tracing fails
        the eager model keeps serving. Returns ``self``.
        """
        if self.device.type != "cpu" or self._frozen_module() is not None:
            return self
        size = self.input_size or 32
        example = torch.zeros(2, self.in_chans, size, size)
        self.model.eval()
        try:
            # torch.jit is deprecated in favour of torch.compile, whose compile time on a 2-core CPU
            # (~a minute) would eat the gain for an explanation or an evaluation
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                module = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(self.model, example)))
        except Exception:  # noqa: BLE001 - an untraceable architecture is served eagerly
            return self
        self._frozen = (self._weights_key(), module)
        return self

    def _weights_key(self) -> tuple:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return tuple((id(t), t._version, t.device.type) for t in tensors)

    def _frozen_module(self) -> Any:
        if self._frozen is None:
            return None
        if self._frozen[0] != self._weights_key():
            self._frozen = None
            return None
        return self._frozen[1]

    def predict_proba(self, images: ImageBatch, batch_size: int = 64) -> np.ndarray:
        """(N, K) softmax probabilities, in ``classes`` order."""
        out = [np.zeros((0, self.num_classes), dtype=np.float32)]
        frozen = self._frozen_module()
        model = self.model if frozen is None else frozen
        with torch.inference_mode():
            for x in self._batches(images, batch_size):
                out.append(model(x).float().softmax(dim=1).cpu().numpy())
        return np.concatenate(out)

    def predict(self, images: ImageBatch, batch_size: int = 64) -> np.ndarray:
        """(N,) class indices."""
        return self.predict_proba(images, batch_size).argmax(axis=1)

    def features(self, images: ImageBatch, batch_size: int = 64) -> np.ndarray:
        """(N, D) pooled pre-logit features (the input of the classifier head)."""
        out = []
        with torch.inference_mode():
            for x in self._batches(images, batch_size):
                f = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                out.append(f.float().flatten(1).cpu().numpy())
        if not out:
            return np.zeros((0, getattr(self.model, "num_features", 0)), dtype=np.float32)
        return np.concatenate(out)

    def __repr__(self) -> str:
        names = self.classes if self.num_classes <= 8 else f"<{self.num_classes} classes>"
        return (f"Classifier({self.arch!r}, classes={names}, in_chans={self.in_chans}, "
                f"input_size={self.input_size}, pretrained_source={self.pretrained_source!r})")


def _to_nchw_unit(images: ImageBatch) -> torch.Tensor:
    """A float32 NCHW tensor in [0, 1] from the accepted image batch forms (or a clear error)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"tensor images must be N x C x H x W with C in (1, 3), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    elif isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"array images must be N x H x W x C with C in (1, 3), got {images.shape}")
        if images.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        elif np.issubdtype(images.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        else:
            raise TypeError(f"array images must be uint8 or float in [0, 1], got {images.dtype}")
    else:
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
        raise ValueError(
            f"float images must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}] "
            "(pass uint8 for 0-255 data)"
        )
    return x


def __getattr__(name: str):
    # save/load live in persist.py (it imports this module); also importable from here for callers
    if name in ("load_classifier", "save_classifier"):
        from meddiffuse.classify import persist

        return getattr(persist, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
