"""Class fidelity: does a classifier trained on *real* images (the judge) see each generated image as the
class it was generated for? The one definition the audit, the study and the benches share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel


class ClassFidelity(BaseModel):
    class_fidelity: float
    class_fidelity_ci95: tuple[float, float] | None = None
    per_class_fidelity: dict[str, float]
    n: int


def class_fidelity(
    judge: Any, images: np.ndarray, labels: Sequence[int] | np.ndarray, *, bootstrap: int = 1000, seed: int = 0
) -> ClassFidelity:
    """Share of generated images the judge assigns to their own class (recall per class), with a
    bootstrap 95% interval."""
    from meddiffuse.classify.metrics import compute_metrics

    labels = np.asarray(labels)
    probs = judge.optimize_for_inference().predict_proba(images)
    scored = compute_metrics(labels, probs, judge.classes, bootstrap=bootstrap, seed=seed)
    return ClassFidelity(
        class_fidelity=scored.accuracy,
        class_fidelity_ci95=tuple(scored.accuracy_ci95) if scored.accuracy_ci95 else None,
        per_class_fidelity={c.name: c.recall for c in scored.per_class},
        n=len(labels),
    )
