"""Test-set metrics: scikit-learn point estimates plus seeded percentile-bootstrap 95% intervals."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from meddiffuse.classify.classifier import Classifier
from meddiffuse.data.dataset import Dataset, Split

Interval = tuple[float, float]
_BOOTSTRAP_CHUNK = 100  # resamples drawn at once: bounds memory at 100 x n indices


class ClassMetrics(BaseModel):
    name: str
    precision: float
    recall: float
    f1: float
    support: int
    auc: float | None  # one-vs-rest; None when the class is absent (or alone) in y_true


class EvalResult(BaseModel):
    """Metrics of one classifier on one labelled image set; JSON-able (``model_dump(mode="json")``)."""

    n: int
    classes: list[str]
    accuracy: float
    balanced_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    auc: float | None  # binary: plain ROC AUC; multi-class: macro one-vs-rest; None if a class is absent
    accuracy_ci95: Interval | None = None
    balanced_accuracy_ci95: Interval | None = None
    macro_f1_ci95: Interval | None = None
    bootstrap: int = 0
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    dataset_id: str | None = None
    split: str | None = None
    arch: str | None = None
    pretrained_source: str | None = None

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat numeric metrics (e.g. for ``mlflow.log_metrics``); undefined values are left out."""
        out = {k: getattr(self, k) for k in
               ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "auc")}
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            ci = getattr(self, f"{name}_ci95")
            if ci is not None:
                out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = ci
        return {f"{prefix}{k}": float(v) for k, v in out.items() if v is not None}


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    bootstrap: int = 1000,
    seed: int = 0,
) -> EvalResult:
    """Metrics from true class indices (N,) and predicted probabilities (N, K); pure, no model."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    k = len(classes)
    if y_prob.ndim != 2 or y_prob.shape[1] != k:
        raise ValueError(f"y_prob must be N x {k} (one column per class), got {y_prob.shape}")
    if y_true.ndim != 1 or len(y_true) != len(y_prob):
        raise ValueError(f"y_true must hold one label per row of y_prob ({len(y_prob)}), got {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"y_true must hold class indices in [0, {k})")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")

    labels = list(range(k))
    y_pred = y_prob.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class_auc = [_auc(y_true == c, y_prob[:, c]) for c in labels]
    with warnings.catch_warnings():  # a class missing from y_true is handled (recall left out), not news
        warnings.simplefilter("ignore", UserWarning)
        balanced_accuracy = balanced_accuracy_score(y_true, y_pred)
    result = EvalResult(
        n=len(y_true),
        classes=list(classes),
        accuracy=accuracy_score(y_true, y_pred),
        balanced_accuracy=balanced_accuracy,
        macro_precision=float(np.mean(precision)),
        macro_recall=float(np.mean(recall)),
        macro_f1=float(np.mean(f1)),
        auc=_overall_auc(y_true, y_prob, per_class_auc),
        per_class=[
            ClassMetrics(name=name, precision=p, recall=r, f1=f, support=int(s), auc=a)
            for name, p, r, f, s, a in zip(classes, precision, recall, f1, support, per_class_auc, strict=True)
        ],
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        bootstrap=bootstrap,
    )
    if bootstrap:
        acc, bal, mf1 = _bootstrap(y_true, y_pred, k, bootstrap, seed)
        result.accuracy_ci95 = _percentile_interval(acc)
        result.balanced_accuracy_ci95 = _percentile_interval(bal)
        result.macro_f1_ci95 = _percentile_interval(mf1)
    return result


def evaluate(
    clf: Classifier,
    dataset: Dataset,
    split: Split | None = "test",
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> EvalResult:
    """Predict every image of ``dataset``'s split and score against its labels."""
    if list(clf.classes) != list(dataset.classes):
        raise ValueError(
            f"classifier classes {clf.classes} differ from dataset {dataset.prefix!r} classes {dataset.classes}"
        )
    entries = dataset.manifest.select(split)
    if not entries:
        raise ValueError(f"dataset {dataset.prefix!r} has no images in split {split!r}")
    images, labels = dataset.load_arrays(entries=entries)
    probs = clf.optimize_for_inference().predict_proba(images, batch_size)  # a whole test set: freeze first
    result = compute_metrics(labels, probs, clf.classes, bootstrap, seed)
    result.dataset_id, result.split = dataset.id, split
    result.arch, result.pretrained_source = clf.arch, clf.pretrained_source
    return result


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def _overall_auc(y_true: np.ndarray, y_prob: np.ndarray, per_class: list[float | None]) -> float | None:
    if any(a is None for a in per_class):
        return None
    if y_prob.shape[1] == 2:
        return float(roc_auc_score(y_true, y_prob[:, 1]))
    # macro one-vs-rest, as roc_auc_score(multi_class="ovr") but without its sum-to-one requirement
    return float(np.mean(per_class))


def _bootstrap(
    y_true: np.ndarray, y_pred: np.ndarray, k: int, resamples: int, seed: int, identity: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 over seeded resamples (vectorised per chunk).

    ``identity``: ``y_true``/``y_pred`` are already (B, n) index rows (B=1: the point estimate)."""
    rng = np.random.default_rng(seed)
    n = y_true.shape[-1]
    acc, bal, mf1 = [], [], []
    for start in range(0, 1 if identity else resamples, _BOOTSTRAP_CHUNK):
        if identity:
            t, p = y_true, y_pred
        else:
            idx = rng.integers(0, n, size=(min(_BOOTSTRAP_CHUNK, resamples - start), n))
            t, p = y_true[idx], y_pred[idx]
        acc.append((t == p).mean(axis=1))
        is_t = t[..., None] == np.arange(k)  # (B, n, K)
        is_p = p[..., None] == np.arange(k)
        support, predicted = is_t.sum(axis=1), is_p.sum(axis=1)  # (B, K)
        tp = (is_t & is_p).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # balanced accuracy averages recall over classes present in the resample (as sklearn)
            bal.append(np.nanmean(np.where(support > 0, tp / support, np.nan), axis=1))
            denom = support + predicted
            mf1.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean(axis=1))
    return np.concatenate(acc), np.concatenate(bal), np.concatenate(mf1)


def _percentile_interval(values: np.ndarray) -> Interval:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


class PairedComparison(BaseModel):
    """Metric of B minus metric of A on the same images, with a paired percentile-bootstrap 95% interval."""

    metric: str
    a: float
    b: float
    difference: float
    ci95: Interval
    n: int
    bootstrap: int

    @property
    def b_better(self) -> bool:
        return self.difference > 0

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.ci95[0] > 0 or self.ci95[1] < 0


PAIRED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def paired_bootstrap(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    num_classes: int,
    *,
    metric: str = "balanced_accuracy",
    resamples: int = 1000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two classifiers' predictions on the same labelled images: each resample draws the same
    images for both, so the interval reflects their difference, not the test set's overall difficulty."""
    if metric not in PAIRED_METRICS:
        raise ValueError(f"metric must be one of {PAIRED_METRICS}, got {metric!r}")
    y_true, pred_a, pred_b = (np.asarray(v, dtype=np.int64) for v in (y_true, pred_a, pred_b))
    if not (len(y_true) == len(pred_a) == len(pred_b)) or len(y_true) == 0:
        raise ValueError("labels and both predictions must be non-empty and of equal length")
    which = PAIRED_METRICS.index(metric)
    point_a = _bootstrap(y_true[None], pred_a[None], num_classes, 1, 0, identity=True)[which][0]
    point_b = _bootstrap(y_true[None], pred_b[None], num_classes, 1, 0, identity=True)[which][0]
    if resamples > 0:
        ma = _bootstrap(y_true, pred_a, num_classes, resamples, seed)[which]
        mb = _bootstrap(y_true, pred_b, num_classes, resamples, seed)[which]  # same seed: same resamples
        ci = _percentile_interval(mb - ma)
    else:
        ci = (float("nan"), float("nan"))
    return PairedComparison(metric=metric, a=float(point_a), b=float(point_b), difference=float(point_b - point_a),
                            ci95=ci, n=len(y_true), bootstrap=resamples)
