"""Fine-tuning a ``Classifier`` on one or more Datasets (real, synthetic, or both mixed).

Recipe: AdamW (timm ``create_optimizer_v2``, no weight decay on norms/biases), linear warm-up then
cosine decay per step (timm ``CosineLRScheduler``), label-smoothed cross-entropy, the domain's
label-preserving augmentations (``train_augmentation``; timm's ``create_transform`` is built for
ImageNet PIL pipelines with random crops that can cut lesions out), optional class-balanced sampling
and optional weight EMA (timm ``ModelEmaV3``). A validation split is carved from the *training*
sources only, stratified by (source, class) and seeded; training stops early on it and the best
epoch's weights are restored.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from sklearn.metrics import balanced_accuracy_score
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import ConcatDataset
from tqdm.auto import tqdm

from meddiffuse.classify.classifier import Classifier
from meddiffuse.data.dataset import Dataset, Entry
from meddiffuse.data.loader import ManifestImageDataset, make_loader, train_augmentation
from meddiffuse.domains import Domain

Source = tuple[Dataset, str | None]  # a dataset and the split to train on (None = all its entries)


class EpochStats(BaseModel):
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_balanced_accuracy: float | None = None
    lr: float
    seconds: float


class SourceInfo(BaseModel):
    prefix: str
    dataset_id: str
    split: str | None
    origin: str  # "real", "synthetic" or "mixed" (by the entries' origin kinds)
    n_train: int
    n_val: int


class TrainResult(BaseModel):
    """What happened during training; JSON-able and small enough to store with the model."""

    arch: str
    pretrained_source: str | None
    classes: list[str]
    sources: list[SourceInfo]
    n_train: int
    n_val: int
    epochs_run: int
    best_epoch: int  # 1-based epoch whose weights the classifier now holds
    stopped_early: bool
    val_metrics: dict[str, float] | None  # loss, accuracy, balanced_accuracy of the best epoch
    history: list[EpochStats]
    hyperparameters: dict[str, float | int | bool | str | None]
    seconds: float
    val_keys: list[str] = Field(default_factory=list, description="'<prefix>/<key>' of validation images")

    @property
    def origin(self) -> str:
        kinds = {s.origin for s in self.sources}
        return kinds.pop() if len(kinds) == 1 else "mixed"


def split_train_val(
    sources: Sequence[Source], val_fraction: float, seed: int
) -> tuple[list[list[Entry]], list[list[Entry]]]:
    """Per source, (train entries, validation entries): stratified by (source, class), seeded.

    Every stratum with at least two images gives at least one to validation and keeps at least one.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for dataset, split in sources:
        entries = sorted(dataset.manifest.select(split), key=lambda e: e.key)
        val_keys: set[str] = set()
        if val_fraction > 0:
            for label in dataset.classes:
                stratum = [e.key for e in entries if e.label == label]
                if len(stratum) >= 2:
                    n_val = min(len(stratum) - 1, max(1, round(len(stratum) * val_fraction)))
                    val_keys.update(stratum[i] for i in rng.permutation(len(stratum))[:n_val])
        train_parts.append([e for e in entries if e.key not in val_keys])
        val_parts.append([e for e in entries if e.key in val_keys])
    return train_parts, val_parts


def train_classifier(
    clf: Classifier,
    train: Dataset | Sequence[Source],
    *,
    domain: Domain,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    val_fraction: float = 0.1,
    balanced: bool = False,
    label_smoothing: float = 0.1,
    augmentation_strength: float = 1.0,
    ema_decay: float | None = None,
    early_stopping_patience: int | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train ``clf`` in place on ``train`` (a Dataset's train split, or ``[(dataset, split), ...]``).

    Mixed training is ``[(real, "train"), (synthetic, None)]``. Validation comes only from these
    sources; the real test split is never touched (a real dataset's test split is refused).
    ``on_epoch`` receives each epoch's stats (e.g. to log them to MLflow). ``mixup`` / ``cutmix`` are
    timm's ``Mixup`` alphas (0 = off; both set = one of the two per batch).
    """
    sources = _check_sources(clf, train)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
    hyperparameters = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs, "val_fraction": val_fraction, "balanced": balanced,
        "label_smoothing": label_smoothing, "augmentation_strength": augmentation_strength,
        "ema_decay": ema_decay, "early_stopping_patience": early_stopping_patience, "seed": seed,
        "input_size": clf.input_size, "mixup": mixup, "cutmix": cutmix,
    }
    started = time.perf_counter()
    # the caller's global RNG is left as it was: seeding happens inside a forked RNG state
    devices = [clf.device.index or 0] if clf.device.type == "cuda" else []
    numpy_state = np.random.get_state()  # timm's Mixup draws from numpy's global RNG; restored after
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            return _train(clf, sources, domain, epochs, batch_size, lr, weight_decay, warmup_epochs, val_fraction,
                          balanced, label_smoothing, augmentation_strength, ema_decay, early_stopping_patience, seed,
                          progress, on_epoch, hyperparameters, started, mixup, cutmix)
        finally:
            np.random.set_state(numpy_state)


def _train(clf, sources, domain, epochs, batch_size, lr, weight_decay, warmup_epochs, val_fraction, balanced,
           label_smoothing, augmentation_strength, ema_decay, early_stopping_patience, seed, progress, on_epoch,
           hyperparameters, started, mixup=0.0, cutmix=0.0) -> TrainResult:
    train_parts, val_parts = split_train_val(sources, val_fraction, seed)
    resolution = max(ds.manifest.resolution for ds, _ in sources)
    augment = train_augmentation(domain, augmentation_strength)
    train_set = _union(sources, train_parts, clf.in_chans, resolution, augment)
    val_set = _union(sources, val_parts, clf.in_chans, resolution, None)
    if train_set is None:
        raise ValueError("no training images in the given sources")

    model = clf.model
    device = clf.device
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed,
                         drop_last=len(train_set) > batch_size,  # a batch of 1 breaks BatchNorm
                         balanced=balanced)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)
    total_steps = epochs * len(loader)
    warmup_steps = min(int(warmup_epochs * len(loader)), total_steps // 2)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=lr * 0.01, warmup_t=warmup_steps,
                                  warmup_lr_init=lr * 0.01, t_in_epochs=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    mixer = None
    if mixup > 0 or cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        np.random.seed(seed)  # repeatable mixing; train_classifier restores the caller's numpy state
        mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                      num_classes=len(clf.classes))
        soft_criterion = SoftTargetCrossEntropy()
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if ema_decay else None

    history: list[EpochStats] = []
    best: tuple[tuple[float, float], int, dict[str, torch.Tensor], dict[str, float]] | None = None
    step, stale = 0, 0
    bar = tqdm(range(1, epochs + 1), desc=f"train {clf.arch}", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress):
            y = y.to(device)
            x = clf.preprocess(x)
            if mixer is not None and len(y) % 2 == 0:  # timm's Mixup pairs the batch with its mirror
                x, soft = mixer(x, y)
                logits = model(x)
                loss = soft_criterion(logits, soft)
            else:
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(model, step=step)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        eval_model = ema.module if ema is not None else model
        val = _validate(clf, eval_model, val_set, batch_size) if val_set is not None else None
        stats = EpochStats(
            epoch=epoch, train_loss=loss_sum / max(seen, 1), train_accuracy=correct / max(seen, 1),
            val_loss=val["loss"] if val else None, val_accuracy=val["accuracy"] if val else None,
            val_balanced_accuracy=val["balanced_accuracy"] if val else None,
            lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0,
        )
        history.append(stats)
        bar.set_postfix(loss=f"{stats.train_loss:.3f}",
                        val_bacc="-" if val is None else f"{val['balanced_accuracy']:.3f}")
        if on_epoch is not None:
            on_epoch(stats)
        if val is not None:
            # best = highest balanced accuracy; on ties (small val sets) the lower loss
            score = (val["balanced_accuracy"], -val["loss"])
            if best is None or score > best[0]:
                best = (score, epoch, _state_copy(eval_model), val)
                stale = 0
            else:
                stale += 1
                if early_stopping_patience is not None and stale >= early_stopping_patience:
                    break
    bar.close()

    if best is not None:
        model.load_state_dict(best[2])
    elif ema is not None:
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    epochs_run = len(history)
    return TrainResult(
        arch=clf.arch,
        pretrained_source=clf.pretrained_source,
        classes=list(clf.classes),
        sources=[
            SourceInfo(prefix=ds.prefix, dataset_id=ds.id, split=split, origin=_origin(tr + va),
                       n_train=len(tr), n_val=len(va))
            for (ds, split), tr, va in zip(sources, train_parts, val_parts, strict=True)
        ],
        n_train=len(train_set),
        n_val=len(val_set) if val_set is not None else 0,
        epochs_run=epochs_run,
        best_epoch=best[1] if best is not None else epochs_run,
        stopped_early=epochs_run < epochs,
        val_metrics=best[3] if best is not None else None,
        history=history,
        hyperparameters=hyperparameters,
        seconds=time.perf_counter() - started,
        val_keys=[f"{ds.prefix}/{e.key}" for (ds, _), va in zip(sources, val_parts, strict=True) for e in va],
    )


def _check_sources(clf: Classifier, train: Dataset | Sequence[Source]) -> list[Source]:
    sources: list[Source] = [(train, "train")] if isinstance(train, Dataset) else list(train)
    if not sources:
        raise ValueError("no training sources given")
    for item in sources:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Dataset)):
            raise TypeError(f"a training source is a Dataset or a (Dataset, split) tuple, got {item!r}")
        ds, split = item
        if split is None and any(e.split == "test" and e.origin.kind == "real" for e in ds.manifest.entries):
            raise ValueError(
                f"{ds.prefix!r} holds real test images; name its split ('train') instead of None "
                "so they are not trained on"
            )
    classes = sources[0][0].classes
    for ds, _ in sources[1:]:
        if ds.classes != classes:
            raise ValueError(f"sources disagree on classes: {classes} vs {ds.classes} ({ds.prefix!r})")
    if clf.classes != classes:
        unnamed = clf.classes == [str(i) for i in range(clf.num_classes)]
        if not unnamed or clf.num_classes != len(classes):
            raise ValueError(f"classifier classes {clf.classes} do not match the dataset's {classes}")
        clf.classes = list(classes)  # a classifier created without names adopts the dataset's
    clf.channels = sources[0][0].manifest.channels
    return sources


class _LabelledUnion(ConcatDataset):
    """Several ManifestImageDatasets as one, with the ``.labels`` balanced sampling needs."""

    def __init__(self, members: list[ManifestImageDataset]) -> None:
        super().__init__(members)
        self.labels = torch.cat([m.labels for m in members])


def _union(
    sources: Sequence[Source], parts: list[list[Entry]], in_chans: int, resolution: int, augment
) -> _LabelledUnion | None:
    """One torch dataset over the sources' entries (each resized to ``resolution``); None if empty."""
    members = []
    for (ds, _), entries in zip(sources, parts, strict=True):
        if entries:
            resize = _resize_to(resolution) if ds.manifest.resolution != resolution else None
            members.append(ManifestImageDataset(ds, entries=entries, transform=_compose(resize, augment),
                                                 channels=in_chans))
    return _LabelledUnion(members) if members else None


def _resize_to(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0].clamp_(0, 1)

    return resize


def _compose(*fns):
    fns = [f for f in fns if f is not None]
    if not fns:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for f in fns:
            x = f(x)
        return x

    return apply


def _validate(clf: Classifier, model: nn.Module, val_set: _LabelledUnion, batch_size: int) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in make_loader(val_set, batch_size, shuffle=False):
            logits.append(model(clf.preprocess(x)).float().cpu())
            labels.append(y)
    out, y = torch.cat(logits), torch.cat(labels)
    pred = out.argmax(1).numpy()
    with warnings.catch_warnings():  # tiny validation sets may lack a predicted class: expected
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y.numpy(), pred))
    return {
        "loss": float(F.cross_entropy(out, y)),
        "accuracy": float((pred == y.numpy()).mean()),
        "balanced_accuracy": balanced,
    }


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _origin(entries: list[Entry]) -> str:
    kinds = {e.origin.kind for e in entries}
    return kinds.pop() if len(kinds) == 1 else "mixed"
