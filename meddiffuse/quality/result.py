"""What an audit produces: one JSON-able pydantic model, with per-class sections and an overall one."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, computed_field

FORMAT_VERSION = 1


class DatasetRef(BaseModel):
    prefix: str
    id: str
    name: str
    domain: str
    n_images: int
    generators: list[str] = Field(default_factory=list, description="origin.generator values named.")


class FidelityScores(BaseModel):
    """Synthetic vs real (training split) in one feature space. ``None`` + a note when not computable."""

    n_real: int
    n_synthetic: int
    frechet_distance: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    c2st_accuracy: float | None = None
    c2st_p_value: float | None = None
    c2st_n: int | None = None
    notes: list[str] = Field(default_factory=list)


class DiversityScores(BaseModel):
    """Mean pairwise MS-SSIM within the set: lower = more diverse; synthetic far above real = collapse."""

    synthetic_ms_ssim: float | None = None
    real_ms_ssim: float | None = None
    notes: list[str] = Field(default_factory=list)


class MemorizationSummary(BaseModel):
    n_synthetic: int
    n_flagged: int
    flagged_share: float
    share_by_space: dict[str, float]


class Section(BaseModel):
    """All scores for one class (or ``overall``)."""

    label: str
    n_synthetic: int
    n_real_train: int
    n_real_test: int
    fidelity: dict[str, FidelityScores] = Field(description="feature space -> scores")
    diversity: DiversityScores
    memorization: MemorizationSummary


class SpaceThreshold(BaseModel):
    metric: str
    threshold: float
    reference_quantiles: dict[str, float]
    flagged_share: float


class PairRecord(BaseModel):
    """A synthetic image and its nearest training image, by store key."""

    synthetic_key: str
    train_key: str
    synthetic_label: str
    train_label: str
    space: str
    distance: float
    threshold: float
    ratio: float
    mirrored: bool
    flagged: bool


class MemorizationReport(BaseModel):
    percentile: float
    mirror: bool = Field(description="Mirrored training images were compared too.")
    spaces: dict[str, SpaceThreshold]
    flagged_keys: list[str] = Field(description="Synthetic images flagged as likely copies.")
    closest_pairs: list[PairRecord]


class Gate(BaseModel):
    max_flagged_share: float = Field(description="Allowed excess over the expected share.")
    expected_share: float = Field(0.0, description="Share expected from unseen real images (percentile x spaces).")
    flagged_share: float
    passed: bool
    message: str


class AuditResult(BaseModel):
    format_version: int = FORMAT_VERSION
    created_at: str
    synthetic: DatasetRef
    real: DatasetRef
    domain: str
    classes: list[str]
    reference_split: str = Field("train", description="Real split the fidelity metrics compare with.")
    feature_spaces: list[str]
    memorization_spaces: list[str]
    seed: int
    k: int
    overall: Section
    per_class: dict[str, Section]
    memorization: MemorizationReport
    gate: Gate
    artifacts: dict[str, str] = Field(default_factory=dict, description="kind -> store key")
    tracking: dict[str, Any] = Field(default_factory=dict, description="MLflow run and generator tags")

    # the rendered pairs image travels with the result until save_audit writes it; never in the JSON
    _pairs_png: bytes | None = PrivateAttr(default=None)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return self.gate.passed

    @property
    def pairs_png(self) -> bytes | None:
        return self._pairs_png

    def verdict(self) -> str:
        """One plain sentence: passed or failed, and why."""
        return self.gate.message


__all__ = [
    "FORMAT_VERSION",
    "AuditResult",
    "DatasetRef",
    "DiversityScores",
    "FidelityScores",
    "Gate",
    "MemorizationReport",
    "MemorizationSummary",
    "PairRecord",
    "Section",
    "SpaceThreshold",
]
