"""``run_audit``: fidelity, diversity and memorization of a synthetic Dataset against the real one.

Fidelity compares synthetic images with the real *training* split (the distribution the generator
learned); memorization is calibrated on the real *test* split (patients the generator never saw).
Every score is given per class and overall; a gate on the share of likely copies decides pass/fail.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import PurePosixPath

import numpy as np
from tqdm.auto import tqdm

from meddiffuse.data.dataset import Dataset, Entry
from meddiffuse.quality.diversity import ms_ssim_diversity
from meddiffuse.quality.features import (
    DOMAIN,
    FeatureExtractor,
    default_extractors,
    domain_of,
    extract_features,
)
from meddiffuse.quality.fidelity import c2st, frechet_distance, kernel_inception_distance, prdc
from meddiffuse.quality.memorization import (
    PIXEL_SPACE,
    MemorizationResult,
    memorization_in_spaces,
)
from meddiffuse.quality.pairs import PairTile, render_pairs_png
from meddiffuse.quality.result import (
    AuditResult,
    DatasetRef,
    DiversityScores,
    FidelityScores,
    Gate,
    MemorizationReport,
    MemorizationSummary,
    PairRecord,
    Section,
    SpaceThreshold,
)

log = logging.getLogger(__name__)

OVERALL = "overall"


class IncompatibleDatasets(ValueError):
    """The synthetic and real datasets cannot be compared (domain, classes, image shape, splits)."""


def check_compatible(synthetic: Dataset, real: Dataset) -> None:
    s, r = synthetic.manifest, real.manifest
    if s.domain != r.domain:
        raise IncompatibleDatasets(f"synthetic dataset is {s.domain!r} but real dataset is {r.domain!r}")
    if s.classes != r.classes:
        raise IncompatibleDatasets(f"class lists differ: synthetic {s.classes} vs real {r.classes}")
    if (s.resolution, s.channels) != (r.resolution, r.channels):
        raise IncompatibleDatasets(
            f"image shapes differ: synthetic {s.resolution} px x {s.channels} ch vs real "
            f"{r.resolution} px x {r.channels} ch; audit against a real dataset at the same resolution"
        )
    if not s.entries:
        raise IncompatibleDatasets(f"synthetic dataset {synthetic.prefix!r} has no images")
    for split in ("train", "test"):
        if not r.select(split):
            raise IncompatibleDatasets(
                f"real dataset {real.prefix!r} has no {split!r} images; the audit needs both splits "
                "(train = what the generator saw, test = calibration for memorization)"
            )


def dataset_ref(dataset: Dataset) -> DatasetRef:
    m = dataset.manifest
    generators = sorted({e.origin.generator for e in m.entries if e.origin.generator})
    return DatasetRef(prefix=dataset.prefix, id=dataset.id, name=m.name, domain=m.domain,
                      n_images=len(m.entries), generators=generators)


def fidelity_scores(
    real: np.ndarray, fake: np.ndarray, *, k: int, seed: int, kid_subsets: int, kid_subset_size: int
) -> FidelityScores:
    """Every fidelity metric for one feature space and one class; a metric that cannot run gets a note."""
    scores = FidelityScores(n_real=len(real), n_synthetic=len(fake))
    try:
        scores.frechet_distance = frechet_distance(real, fake)
    except ValueError as exc:
        scores.notes.append(f"FD: {exc}")
    try:
        kid = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed)
        scores.kid, scores.kid_std = kid["mean"], kid["std"]
    except ValueError as exc:
        scores.notes.append(f"KID: {exc}")
    try:
        pr = prdc(real, fake, k=k)
        scores.precision, scores.recall = pr["precision"], pr["recall"]
        scores.density, scores.coverage = pr["density"], pr["coverage"]
    except ValueError as exc:
        scores.notes.append(f"PRDC: {exc}")
    try:
        test = c2st(real, fake, seed=seed)
        scores.c2st_accuracy, scores.c2st_p_value, scores.c2st_n = test["accuracy"], test["p_value"], test["n"]
    except ValueError as exc:
        scores.notes.append(f"C2ST: {exc}")
    return scores


def diversity_scores(synthetic: np.ndarray, real: np.ndarray, *, max_pairs: int, seed: int) -> DiversityScores:
    scores = DiversityScores()
    for attr, images, name in (("synthetic_ms_ssim", synthetic, "synthetic"), ("real_ms_ssim", real, "real")):
        try:
            setattr(scores, attr, ms_ssim_diversity(images, max_pairs=max_pairs, seed=seed))
        except ValueError as exc:
            scores.notes.append(f"{name}: {exc}")
    return scores


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def memorization_summary(mem: MemorizationResult, select: np.ndarray) -> MemorizationSummary:
    flags = np.asarray(mem.flagged, dtype=bool)[select]
    n = int(select.sum()) if select.dtype == bool else len(select)
    by_space = {
        name: float(np.asarray(space.flagged, dtype=bool)[select].mean()) if n else 0.0
        for name, space in mem.spaces.items()
    }
    return MemorizationSummary(n_synthetic=n, n_flagged=int(flags.sum()),
                               flagged_share=float(flags.mean()) if n else 0.0, share_by_space=by_space)


def gate_verdict(mem: MemorizationResult, max_share: float) -> Gate:
    """Fail when the flagged share exceeds what unseen real images would show by more than ``max_share``.

    A real image the generator never saw falls below the 1st-percentile threshold ~1% of the time in
    each space, and an image is flagged if it is close in *any* space; so even a perfect generator has
    an expected flagged share of about percentile x spaces. Gating the raw share at 1% would fail it.
    """
    n, n_flagged, share = mem.n_synthetic, sum(mem.flagged), mem.flagged_share
    expected = min(1.0, mem.percentile / 100.0 * max(1, len(mem.spaces)))
    limit = expected + max_share
    passed = share <= limit
    gate = (f"gate: at most {limit:.1%} = {expected:.1%} expected from unseen real images "
            f"+ {max_share:.1%} allowed excess")
    if passed:
        message = (f"PASSED: {n_flagged}/{n} synthetic images ({share:.1%}) look like copies of training "
                   f"images ({gate}).")
    else:
        message = (f"FAILED: {n_flagged}/{n} synthetic images ({share:.1%}) are closer to a real training "
                   f"image than {100 - mem.percentile:g}% of real test images are: likely copies of "
                   f"patients' images ({gate}).")
    return Gate(max_flagged_share=max_share, expected_share=expected, flagged_share=share, passed=passed,
                message=message)


def _short(key: str) -> str:
    return PurePosixPath(key).name


def closest_pair_records(
    mem: MemorizationResult,
    top: int,
    synthetic_entries: list[Entry],
    train_entries: list[Entry],
) -> list[PairRecord]:
    return [
        PairRecord(
            synthetic_key=synthetic_entries[p.synthetic_index].key,
            train_key=train_entries[p.train_index].key,
            synthetic_label=synthetic_entries[p.synthetic_index].label,
            train_label=train_entries[p.train_index].label,
            space=p.space, distance=p.distance, threshold=p.threshold, ratio=p.ratio,
            mirrored=p.mirrored, flagged=p.flagged,
        )
        for p in mem.closest_pairs(top)
    ]


def pairs_png(
    mem: MemorizationResult, top: int, synthetic: np.ndarray, train: np.ndarray, records: list[PairRecord]
) -> bytes:
    tiles = []
    for rank, (pair, rec) in enumerate(zip(mem.closest_pairs(top), records, strict=True), start=1):
        match = train[pair.train_index]
        status = "LIKELY COPY" if rec.flagged else "ok"
        tiles.append(PairTile(
            synthetic=synthetic[pair.synthetic_index],
            train=match[:, ::-1] if rec.mirrored else match,
            caption=(f"#{rank} {status}  ({rec.space})\n"
                     f"distance {rec.distance:.4f} / threshold {rec.threshold:.4f}\n"
                     f"synthetic {rec.synthetic_label}: {_short(rec.synthetic_key)}\n"
                     f"train {rec.train_label}: {_short(rec.train_key)}"
                     + ("\n(mirrored)" if rec.mirrored else "")),
            flagged=rec.flagged,
        ))
    return render_pairs_png(tiles)


def run_audit(
    synthetic: Dataset,
    real: Dataset,
    *,
    extractors: dict[str, FeatureExtractor] | None = None,
    gate_flagged_share: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    percentile: float = 1.0,
    k: int = 5,
    memorization_space: str | None = None,
    mirror: bool | None = None,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
    diversity_pairs: int = 500,
    top_pairs: int = 8,
    batch_size: int = 256,
) -> AuditResult:
    """Audit ``synthetic`` against ``real`` (its train split for fidelity, test split for calibration).

    ``extractors`` name the feature spaces (``None``: ImageNet EfficientNet-Lite0 + a domain classifier
    trained on real train now). Memorization uses pixels plus one feature space: ``memorization_space``,
    else ``domain`` when present, else the first extractor. ``mirror`` (default: the domain's hflip
    augmentation) also matches mirrored training images.
    """
    check_compatible(synthetic, real)
    if not 0.0 <= gate_flagged_share <= 1.0:
        raise ValueError(f"gate_flagged_share must be in [0, 1], got {gate_flagged_share}")
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    if extractors is None:
        extractors = default_extractors(real, seed=seed, progress=progress)
    if PIXEL_SPACE in extractors:
        raise ValueError(f"extractor name {PIXEL_SPACE!r} is reserved for raw-pixel memorization; rename it")
    if memorization_space is None:
        memorization_space = DOMAIN if DOMAIN in extractors else next(iter(extractors), None)
    elif memorization_space not in extractors:
        raise ValueError(f"memorization_space {memorization_space!r} is not one of {sorted(extractors)}")
    if mirror is None:
        mirror = domain_of(real).hflip
    classes = real.classes

    syn_entries, train_entries = synthetic.manifest.select(), real.manifest.select("train")
    syn_x, syn_y = synthetic.load_arrays(entries=syn_entries)
    train_x, train_y = real.load_arrays(entries=train_entries)
    test_x, test_y = real.load_arrays("test")
    images = {"synthetic": syn_x, "train": train_x, "test": test_x}
    if mirror:
        images["mirrored"] = np.ascontiguousarray(train_x[:, :, ::-1])

    features = {
        name: {
            part: extract_features(fn, x, batch_size=batch_size, progress=progress, desc=f"{name}: {part}")
            # mirrored training images only matter in the space memorization is judged in
            for part, x in images.items() if part != "mirrored" or name == memorization_space
        }
        for name, fn in extractors.items()
    }
    mem = memorization_in_spaces(images, features.get(memorization_space or ""), memorization_space,
                             percentile=percentile, progress=progress)

    def section(label: str, syn_sel: np.ndarray, train_sel: np.ndarray, test_sel: np.ndarray,
                diversity: DiversityScores) -> Section:
        fidelity = {
            name: fidelity_scores(f["train"][train_sel], f["synthetic"][syn_sel], k=k, seed=seed,
                                  kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
            for name, f in features.items()
        }
        return Section(label=label, n_synthetic=int(syn_sel.sum()), n_real_train=int(train_sel.sum()),
                       n_real_test=int(test_sel.sum()), fidelity=fidelity, diversity=diversity,
                       memorization=memorization_summary(mem, syn_sel))

    per_class: dict[str, Section] = {}
    for c, label in enumerate(tqdm(classes, desc="per-class scores", disable=not progress, leave=False)):
        syn_sel, train_sel, test_sel = syn_y == c, train_y == c, test_y == c
        div = diversity_scores(syn_x[syn_sel], train_x[train_sel], max_pairs=diversity_pairs, seed=seed)
        per_class[label] = section(label, syn_sel, train_sel, test_sel, div)
    # diversity is a within-class notion; overall = mean over classes, not pairs across classes
    overall_div = DiversityScores(
        synthetic_ms_ssim=_mean_or_none([s.diversity.synthetic_ms_ssim for s in per_class.values()]),
        real_ms_ssim=_mean_or_none([s.diversity.real_ms_ssim for s in per_class.values()]),
    )
    overall = section(OVERALL, np.ones(len(syn_y), bool), np.ones(len(train_y), bool),
                      np.ones(len(test_y), bool), overall_div)

    records = closest_pair_records(mem, top_pairs, syn_entries, train_entries)
    report = MemorizationReport(
        percentile=percentile,
        mirror=bool(mirror),
        spaces={
            name: SpaceThreshold(metric=s.metric, threshold=s.threshold,
                                 reference_quantiles=s.reference_quantiles, flagged_share=s.flagged_share)
            for name, s in mem.spaces.items()
        },
        flagged_keys=[syn_entries[i].key for i in mem.flagged_indices],
        closest_pairs=records,
    )
    result = AuditResult(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        synthetic=dataset_ref(synthetic),
        real=dataset_ref(real),
        domain=real.manifest.domain,
        classes=list(classes),
        feature_spaces=list(extractors),
        memorization_spaces=list(mem.spaces),
        seed=seed,
        k=k,
        overall=overall,
        per_class=per_class,
        memorization=report,
        gate=gate_verdict(mem, gate_flagged_share),
    )
    result._pairs_png = pairs_png(mem, top_pairs, syn_x, train_x, records)
    log.info("audit of %s: %s", synthetic.prefix, result.verdict())
    return result


__all__ = [
    "OVERALL",
    "IncompatibleDatasets",
    "check_compatible",
    "diversity_scores",
    "fidelity_scores",
    "gate_verdict",
    "run_audit",
]
