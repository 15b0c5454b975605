"""Closing the TSTR gap at CPU scale: scaling curves and levers, one at a time, on the same footing.

Every run uses ../shared/data/<domain>/64px at 32 px with the study's split (20% of each class to train,
80% to test, seed 0), the `cpu-small` UNet and one judge/TRTR classifier (EfficientNet-Lite0, offline
ImageNet weights) trained on the real 20%. Two steps, both resumable (a working folder keeps every
generator, snapshot, synthetic set and scored row; a rerun skips what is done):

  train     one generator run per named variant; snapshots of its EMA model at the curve's budgets
            (constant LR after warm-up, so a snapshot at N steps is what an N-step run would give) and,
            where asked, extra EMA decays kept beside it
  evaluate  for each (generator snapshot, sampling, classifier recipe) row: sample a balanced synthetic
            set, then class fidelity (the judge), the audit's per-class coverage/recall/FD/MS-SSIM and
            copy gate, TSTR (Lite0 trained on the synthetic set) and, where asked, mixed (real + synthetic)

    python bench/science.py train --domain brain-mri --variant base --steps 1200 --snapshots 300 600 1200
    python bench/science.py evaluate --domain brain-mri --plan curve

Writes bench/results/science-<plan>-<domain>.json (one row per measured configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import real_data, write_result  # noqa: E402

# generators, snapshots, synthetic sets and scored rows (git-ignored); MEDDIFFUSE_SCIENCE_WORK moves it
WORK = Path(os.environ.get("MEDDIFFUSE_SCIENCE_WORK", Path(__file__).resolve().parents[1] / ".meddiffuse" / "science"))
ARCH = "efficientnet_lite0"
RESOLUTION = 32

# generator variants: overrides of the `cpu-small` preset (and a resolution); `base` is the curve's recipe
# (float32 as first measured: the cpu-study preset trains in bf16 where the CPU has it since 2026-12-06)
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"preset": "cpu-study", "mixed_precision": "no"},  # = cpu-small with a constant LR after warm-up
    "cosine": {"preset": "cpu-small", "lr_schedule": "cosine"},
    "augment": {"preset": "cpu-study", "augment_strength": 1.0, "mixed_precision": "no"},
    "px64": {"preset": "cpu-study", "resolution": 64, "mixed_precision": "no"},
    # the recipe's generator since 2026-12-06: bf16 autocast (float32 where the CPU lacks native bf16: the
    # record says which)
    "bf16": {"preset": "cpu-study", "mixed_precision": "bf16"},
    # the same recipe trained on a CPU with AVX512-BF16 and no AMX (AMD Zen 4): bf16 arithmetic differs by CPU
    # kind, so its runs get their own name and their rows never stand in for the AMX run's (`recorded`)
    "bf16-avx512": {"preset": "cpu-study", "mixed_precision": "bf16"},
    # GPU scale (the device machine): the study preset at 64 px; budgets in README ("GPU scale")
    "gpu64": {"preset": "gpu-base", "lr_schedule": "constant_with_warmup", "resolution": 64},
}


def experiment(domain: str, resolution: int = RESOLUTION):
    """The study's real dataset for ``domain`` (same split and seed as bench/study.py), ingested once."""
    from meddiffuse.config import ExperimentConfig, Settings
    from meddiffuse.experiment import Experiment

    data = real_data(domain)
    if data is None:
        raise SystemExit(f"real images for {domain} not found under ../shared/data; nothing to measure")
    settings = Settings(home=WORK / domain)
    config = ExperimentConfig(domain=domain, data=data, name=f"science-{domain}-{resolution}px",
                              resolution=resolution, train_fraction=0.2, archs=[ARCH], epochs=6, input_size=96,
                              val_fraction=0.1, ema_decay=None, explain_per_model=0, register_models=False, seed=0,
                              # the experiment only gives the split and the judge; this bench trains its own
                              # generators, so these stay as first recorded (the defaults before cpu-study)
                              generator_preset="cpu-small", generator_steps=700, generator_minutes=None,
                              sampler="dpmsolver++",
                              guidance=2.0, synthetic_per_class=None)
    exp = Experiment(config, settings, progress=False, log=lambda m: print(f"[science] {m}", flush=True))
    exp.ingest()
    return exp


def generator_prefix(exp, variant: str) -> str:
    return f"{exp.paths.root}/generators/{variant}"


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    from meddiffuse.generate import create_generator_config, train_generator
    from meddiffuse.generate.artifact import model_prefix
    from meddiffuse.generate.checkpoint import latest_checkpoint
    from meddiffuse.generate.metadata import GENERATOR_JSON

    overrides = dict(VARIANTS[a.variant])
    resolution = overrides.pop("resolution", RESOLUTION)
    preset = overrides.pop("preset", "cpu-small")
    exp = experiment(a.domain, resolution)
    prefix = generator_prefix(exp, a.variant)
    record = WORK / a.domain / f"train-{a.variant}.json"
    if exp.store.exists(f"{model_prefix(prefix)}/{GENERATOR_JSON}") and record.exists():
        print(f"[science] {a.domain}/{a.variant} already trained: {record}")
        return
    config = create_generator_config(preset, exp.domain, resolution, **overrides)
    t0 = time.monotonic()
    last = [t0]

    def on_step(s) -> None:
        if s.step % 50 == 0:
            now = time.monotonic()
            print(f"[science] {a.domain}/{a.variant} step {s.step} loss {s.loss:.4f} "
                  f"{(now - last[0]) / 50:.2f} s/step", flush=True)
            last[0] = now

    info = train_generator(
        exp.real, config, exp.store, prefix, max_steps=a.steps, max_minutes=a.minutes,
        resume=latest_checkpoint(exp.store, prefix) is not None, checkpoint_every=100, seed=0,
        settings=exp.settings, track=False, snapshot_steps=a.snapshots, ema_variants=a.ema_variants,
        on_step=on_step,
    )
    # only the snapshots the run reached: a minutes cap may stop it before the later ones
    reached = {s for s in a.snapshots if s <= info.steps_trained} | {info.steps_trained}
    payload = {"domain": a.domain, "variant": a.variant, "overrides": VARIANTS[a.variant],
               "config": config.model_dump(mode="json"), "snapshots": sorted(reached),
               "ema_variants": a.ema_variants, "ema_variants_checkpointed": True,
               "info": info.model_dump(mode="json", exclude={"loss_history"}),
               "loss_history": info.loss_history[::5], "wall_seconds": round(time.monotonic() - t0, 1),
               "torch_threads": torch.get_num_threads()}
    tmp = record.with_suffix(".part")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(record)
    print(f"[science] {a.domain}/{a.variant}: {info.steps_trained} steps in {info.seconds / 60:.1f} min -> {record}")


# -- evaluation ----------------------------------------------------------------------------------------
# A row: which generator (variant, snapshot step, EMA), how it is sampled, how the classifier is trained.
DEFAULT_SAMPLING = {"sampler": "dpmsolver++", "steps": 20, "guidance": 2.0, "per_class": 128}
DEFAULT_RECIPE = {"epochs": 6, "augmentation_strength": 1.0, "mixup": 0.0, "cutmix": 0.0, "lr": 1e-3,
                  # 0.1 held out to pick the best epoch (0 = train on all, keep the last); an EMA of the weights
                  "val_fraction": 0.1, "ema_decay": None}
BEST_CLASSIFIER: dict[str, Any] = {}  # the classifier plan's winner on brain-mri (changes to DEFAULT_RECIPE)


def row(lever: str, value: Any, variant: str = "base", step: int | None = None, ema: float | None = None,
        mixed: bool = False, **changes: Any) -> dict[str, Any]:
    """One configuration: the defaults with ``changes`` (sampling or classifier keys) applied."""
    sampling = {k: changes.pop(k, v) for k, v in DEFAULT_SAMPLING.items()}
    recipe = {k: changes.pop(k, v) for k, v in DEFAULT_RECIPE.items()}
    if changes:
        raise ValueError(f"unknown row keys {sorted(changes)}")
    return {"lever": lever, "value": value, "variant": variant, "step": step, "ema": ema,
            "sampling": sampling, "recipe": recipe, "mixed": mixed}


# the recipe's guidance until 2026-12-07 (w = 2): the diversity and combined plans measured their levers around
# it, so it stays their baseline row (and a fresh working folder finds their recorded rows again)
FORMER_GUIDANCE = 2.0


def recipe_keys(*, classifier: bool) -> dict[str, Any]:
    """The `cpu-study` recipe's sampling keys for a row (and, with ``classifier``, its classifier's training)."""
    from meddiffuse.config import CPU_STUDY

    keys = {"sampler": CPU_STUDY["sampler"], "guidance": CPU_STUDY["guidance"],
            "per_class": CPU_STUDY["synthetic_per_class"]}
    return keys | ({k: CPU_STUDY[k] for k in ("epochs", "val_fraction", "ema_decay")} if classifier else {})


def plan(name: str, domain: str, final: int, variant: str = "base") -> list[dict[str, Any]]:
    """The rows of a plan; ``final`` is the base run's last step (the curve's end, the levers' generator)."""
    if name == "curve":
        base = trained(domain, variant)
        steps = [s for s in base["snapshots"] if s <= final]
        rows = [row("generator steps", s, variant=variant, step=s, mixed=s == final) for s in steps]
        # runs trained before extra EMAs were checkpointed restarted them on resume: then only the raw weights
        # (0) compare fairly
        decays = [d for d in base["ema_variants"] if d == 0 or base["info"]["resumed_from_step"] is None
                  or base.get("ema_variants_checkpointed")]
        rows += [row("EMA decay", d, variant=variant, step=final, ema=d) for d in decays]
        return rows
    if name == "generator":  # generator-side levers at a short, equal budget against base at that step
        short = trained(domain, "cosine")["info"]["steps_trained"]
        levers = [("cosine", "cosine LR"), ("augment", "affine+intensity augmentation"),
                  ("px64", "64 px, equal wall-clock")]
        return [row("generator recipe", "constant LR (base)", step=short)] + [
            row("generator recipe", label, variant=v) for v, label in levers
            if (WORK / domain / f"train-{v}.json").exists()]
    if name == "sampling":
        # most informative first: `evaluate --first N` scores a prefix when time is short
        return [row("sampler", "dpmsolver++ (ODE)", step=final),
                row("sampler", "dpmsolver++-sde", step=final, sampler="dpmsolver++-sde"),
                row("guidance", 1.0, step=final, guidance=1.0),
                row("guidance", 0.0, step=final, guidance=0.0),
                row("sampler steps", 10, step=final, steps=10),
                row("guidance", 4.0, step=final, guidance=4.0),
                row("guidance + set size", "w=1, 384/class", step=final, guidance=1.0, per_class=384)]
    if name == "classifier":
        return [row("classifier recipe", "default (6 epochs)", step=final),
                row("classifier recipe", "mixup 0.2 + cutmix 1.0", step=final, mixup=0.2, cutmix=1.0),
                row("classifier recipe", "15 epochs + aug x2 + mixup/cutmix", step=final, epochs=15,
                    augmentation_strength=2.0, mixup=0.2, cutmix=1.0),
                row("classifier recipe", "15 epochs", step=final, epochs=15),
                row("classifier recipe", "aug x2", step=final, augmentation_strength=2.0),
                row("classifier recipe", "no affine/intensity aug", step=final, augmentation_strength=0.0)]
    if name == "size":  # synthetic set size at the recipe's sampler: is TSTR limited by how many images it sees?
        from meddiffuse.config import CPU_STUDY

        # the larger set first (`--first 1`); the 128 row is the recipe row (mixed included), scored once
        return [row("synthetic per class", n, step=final, mixed=n == 128, sampler=CPU_STUDY["sampler"],
                    guidance=CPU_STUDY["guidance"], per_class=n, **BEST_CLASSIFIER) for n in (512, 128)]
    if name == "training":  # TSTR is also a training problem: the classifier's recipe on the recipe's synthetic set
        recipe_set = recipe_keys(classifier=False)
        # the first row is the recipe row (cached: scored once); the synthetic validation split picks the epoch
        # that fits *synthetic* images best, which need not be the one that transfers to real ones
        return [row("classifier training", "best epoch on synthetic val (default)", step=final, mixed=True,
                    **recipe_set),
                row("classifier training", "last epoch, no val split", step=final, val_fraction=0.0, **recipe_set),
                row("classifier training", "EMA 0.998 of the weights", step=final, ema_decay=0.998, **recipe_set),
                row("classifier training", "last epoch + EMA 0.998", step=final, val_fraction=0.0, ema_decay=0.998,
                    **recipe_set),
                row("classifier training", "12 epochs, last epoch", step=final, val_fraction=0.0, epochs=12,
                    **recipe_set)]
    if name == "augment":  # generator augmentation at the recipe's budget and set, against the recipe row
        recipe_set = recipe_keys(classifier=False)
        # the first row is the recipe row (the base run's, read back from bench/results when the base generator
        # is not in this working folder: a fresh re-run reproduces every one of its metrics)
        return [row("generator augmentation", "flips only (recipe)", step=final, mixed=True, **recipe_set),
                row("generator augmentation", "flips + affine/intensity (strength 1)", variant="augment", step=final,
                    mixed=True, **recipe_set)]
    if name == "resolution":  # 64 px at the FLOPs of the 32-px recipe generator (a step costs ~4x): 1/4 the steps
        from meddiffuse.config import CPU_STUDY

        at = {"sampler": CPU_STUDY["sampler"], "guidance": CPU_STUDY["guidance"], "per_class": 128}
        # 128 per class: a 64-px image costs ~4x to sample too; the 32-px row at 128 is the size plan's (recorded)
        return [row("generator resolution", f"32 px, {CPU_STUDY['generator_steps']} steps (recipe)",
                    step=CPU_STUDY["generator_steps"], mixed=True, **at),
                row("generator resolution", f"64 px, {final} steps (equal FLOPs)", variant="px64", step=final,
                    mixed=True, **at)]
    if name == "diversity":  # the levers still open after the recipe, each against the recipe row on one run
        at = recipe_keys(classifier=True) | {"guidance": FORMER_GUIDANCE}
        # most informative first (`--first N`): the recipe row (the study's number on this run); the levers at
        # the recipe's set size, each alone: guidance both ways (lower: more diverse, higher: more of what sets
        # a class apart; brain MRI's glioma samples are narrower than real ones), the generator's EMA decay
        # (kept beside the run by `train --ema-variants`), fewer sampler steps; then the larger set, alone and
        # with lower guidance
        rows = [row("recipe", "cpu-study (w=2, until 2026-12-07)", step=final, mixed=True, variant=variant, **at),
                *(row("guidance", w, step=final, variant=variant, **(at | {"guidance": w})) for w in (1.5, 3.0))]
        decays = [d for d in trained(domain, variant)["ema_variants"] if d > 0]
        rows += [row("generator EMA decay", d, step=final, ema=d, variant=variant, **at) for d in decays]
        return rows + [row("sampler steps", 10, step=final, steps=10, variant=variant, **at),
                       row("set size", "1024/class", step=final, variant=variant, **(at | {"per_class": 1024})),
                       row("guidance + set size", "w=1.5, 1024/class", step=final, variant=variant,
                           **(at | {"guidance": 1.5, "per_class": 1024}))]
    if name == "combined":  # the diversity plan's winners (lower guidance, generator EMA 0.99) together
        at = recipe_keys(classifier=True) | {"guidance": FORMER_GUIDANCE}
        if 0.99 not in trained(domain, variant)["ema_variants"]:  # say so before any sampling starts
            raise SystemExit(f"{domain}/{variant} kept no generator EMA 0.99 beside it: re-train it with "
                             f"`bench/science.py train ... --ema-variants 0.99`")
        # its own file. Most informative first (`--first N`): lower guidance still (w = 1) with the shorter EMA,
        # with its mixed classifier (the best row of the AMX run's bf16 generator, 0.91, scored there without
        # one); then the recipe row re-scored on this run (a run re-trained to the same step must reproduce the
        # diversity plan's recipe row: that says whether that plan's rows share this footing); w = 1 alone (is
        # the shorter EMA needed?); then the diversity plan's two winners (w = 1.5, EMA 0.99) together
        return [row("guidance + generator EMA", "w=1.0, EMA 0.99", step=final, ema=0.99, mixed=True,
                    variant=variant, **(at | {"guidance": 1.0})),
                row("recipe", "cpu-study (w=2, until 2026-12-07)", step=final, mixed=True, variant=variant, **at),
                row("guidance", 1.0, step=final, variant=variant, **(at | {"guidance": 1.0})),
                row("guidance + generator EMA", "w=1.5, EMA 0.99", step=final, ema=0.99, mixed=True,
                    variant=variant, **(at | {"guidance": 1.5}))]
    if name == "guidance":  # guidance on one run, every row with its mixed classifier (no extra EMA needed)
        at = recipe_keys(classifier=True)
        # w = 1 (brain MRI's lever, 0.915 on the AMX run; the recipe since ALL confirmed it on 2026-12-07) against
        # the former w = 2, then lower still (w = 0.5: does the trend go on, or does class fidelity start to cost
        # more than diversity gives?); `--guidance W` scores only the rows at those scales
        return [row("guidance", w, step=final, mixed=True, variant=variant, **(at | {"guidance": w}))
                for w in (1.0, FORMER_GUIDANCE, 0.5)]
    if name == "compute":  # the recipe at every snapshot of a (faster) run: does more compute in 30 min close it?
        from meddiffuse.config import CPU_STUDY

        at = recipe_keys(classifier=True)
        snaps = sorted((s for s in trained(domain, variant)["snapshots"] if s <= final), reverse=True)
        # the recipe's budget first, then the largest (`--first N`); those two with their mixed classifier
        budget = CPU_STUDY["generator_steps"]
        snaps = [s for s in snaps if s == budget] + [s for s in snaps if s != budget]
        return [row("generator steps (recipe)", s, variant=variant, step=s, mixed=s in (budget, final), **at)
                for s in snaps]
    if name == "recipe":  # the experiment's default recipe (cpu-study) as one row, mixed included
        # the recipe's classifier since 2026-12-06 (rows before it picked their epoch on a val split)
        return [row("recipe", "cpu-study", step=final, mixed=True,
                    **(recipe_keys(classifier=True) | BEST_CLASSIFIER))]
    raise SystemExit(f"unknown plan {name!r}")


# what makes two rows the same measurement (labels and results aside)
CONFIG_KEYS = ("variant", "step", "ema", "sampling", "recipe", "mixed")
RECIPE_ADDED = {"val_fraction": 0.1, "ema_decay": None}  # classifier keys added later -> their value before


def recorded(domain: str, r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The row ``r`` as an earlier run scored it into bench/results (and that run's generator record), or None.

    For generators no longer in the working folder: at one thread count on one CPU kind the whole pipeline is
    deterministic (fresh re-runs of recipe rows, at one and at two threads, reproduced every metric), so a
    recorded row is the row."""
    from bench.common import RESULTS

    def config(x: dict[str, Any]) -> dict[str, Any]:  # recipes recorded before a key existed had its old value
        return {k: ({**RECIPE_ADDED, **x[k]} if k == "recipe" else x.get(k)) for k in CONFIG_KEYS}

    want = config(r)
    for path in sorted(RESULTS.glob(f"science-*-{domain}.json")):
        d = json.loads(path.read_text())
        if d.get("domain") != domain:
            continue
        for found in d.get("rows") or []:
            if config(found) == want and r["variant"] in (d.get("generator_runs") or {}):
                return ({**found, **{k: r[k] for k in LABELS}, "recorded_in": path.name},
                        d["generator_runs"][r["variant"]])
    return None


def trained(domain: str, variant: str) -> dict[str, Any]:
    record = WORK / domain / f"train-{variant}.json"
    if not record.exists():
        raise SystemExit(f"{domain}/{variant} is not trained yet: run `bench/science.py train` first")
    return json.loads(record.read_text())


LABELS = ("lever", "value")


def key_of(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class Evaluator:
    """Scores rows for one domain; every expensive piece (sets, classifiers, rows) is cached on disk."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.exps: dict[int, Any] = {}
        self.judges: dict[int, Any] = {}

    def exp(self, resolution: int):
        if resolution not in self.exps:
            self.exps[resolution] = experiment(self.domain, resolution)
        return self.exps[resolution]

    def judge(self, resolution: int):
        """Lite0 trained on the real 20% with the default recipe: judge of class fidelity and audit features."""
        from meddiffuse.classify import load_classifier

        if resolution not in self.judges:
            exp = self.exp(resolution)
            exp.train_one(ARCH, "real")
            self.judges[resolution] = load_classifier(exp.paths.classifier(ARCH, "real"), exp.store,
                                                      exp.settings).optimize_for_inference()
        return self.judges[resolution]

    def real_baseline(self, resolution: int) -> dict[str, Any]:
        """TRTR with the default recipe: the judge itself (the experiment's real-data classifier stage)."""
        self.judge(resolution)
        done = self.exp(resolution).train_one(ARCH, "real")
        return {k: done.get(k) for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
                                         "macro_f1", "n_train", "best_epoch", "pretrained")}

    def classifier(self, resolution: int, recipe: dict[str, Any], synthetic=None, real: bool = True):
        """Train Lite0 with ``recipe`` on real, synthetic or both; score it on the real test split (cached)."""
        from meddiffuse.classify import create_classifier, evaluate, train_classifier

        exp = self.exp(resolution)
        what = {"recipe": recipe, "real": real, "synthetic": synthetic.id if synthetic is not None else None,
                "resolution": resolution}
        cache = WORK / self.domain / "classifiers" / f"{key_of(what)}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        sources = ([(exp.real, "train")] if real else []) + ([(synthetic, None)] if synthetic is not None else [])
        clf = create_classifier(ARCH, exp.domain.num_classes, exp.domain.channels, input_size=96,
                                classes=exp.domain.classes, seed=0)
        t0 = time.monotonic()
        info = train_classifier(clf, sources, domain=exp.domain, epochs=recipe["epochs"], batch_size=32,
                                lr=recipe["lr"], val_fraction=recipe["val_fraction"], early_stopping_patience=4,
                                augmentation_strength=recipe["augmentation_strength"], mixup=recipe["mixup"],
                                cutmix=recipe["cutmix"], ema_decay=recipe["ema_decay"], seed=0)
        r = evaluate(clf, exp.test_set, "test", bootstrap=1000, seed=0)
        out = {"accuracy": r.accuracy, "accuracy_ci95": list(r.accuracy_ci95 or []),
               "balanced_accuracy": r.balanced_accuracy,
               "balanced_accuracy_ci95": list(r.balanced_accuracy_ci95 or []), "macro_f1": r.macro_f1,
               # where the gap sits: which real classes the classifier misses, and for which others
               "recall_per_class": {m.name: m.recall for m in r.per_class}, "confusion_matrix": r.confusion_matrix,
               "n_train": info.n_train, "epochs_run": info.epochs_run, "best_epoch": info.best_epoch,
               "pretrained": clf.pretrained_source, "train_seconds": round(time.monotonic() - t0, 1)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
        return out

    def synthetic(self, r: dict[str, Any]):
        """The row's synthetic set (generated once; the same per-image seeds at any set size)."""
        from meddiffuse.generate import generate_dataset, load_generator, snapshot_prefix

        resolution = VARIANTS[r["variant"]].get("resolution", RESOLUTION)
        exp = self.exp(resolution)
        prefix = generator_prefix(exp, r["variant"])
        ref = prefix if r["step"] is None and r["ema"] is None else snapshot_prefix(prefix, r["step"], r["ema"])
        record = WORK / self.domain / f"train-{r['variant']}.json"
        if r["ema"] is None and (r["step"] is None or (
                record.exists() and r["step"] == trained(self.domain, r["variant"])["info"]["steps_trained"])):
            ref = prefix  # the run's final model is its last snapshot
        s = r["sampling"]
        t0 = time.monotonic()
        gen = load_generator(ref, exp.store, exp.settings)
        ds = generate_dataset(gen, exp.store, f"{exp.paths.root}/sets/{key_of([ref, s])}", s["per_class"],
                              sampler=s["sampler"], steps=s["steps"], guidance=s["guidance"], seed=0,
                              batch_size=64)
        return ds, gen, time.monotonic() - t0, resolution

    def quality(self, ds, resolution: int) -> dict[str, Any]:
        """Class fidelity and the audit of one synthetic set, cached by the set's id: rows that change only the
        classifier's training share their set and are audited once."""
        from meddiffuse.quality.audit import run_audit
        from meddiffuse.quality.class_fidelity import class_fidelity
        from meddiffuse.quality.features import classifier_extractor

        cache = WORK / self.domain / "quality" / f"{ds.id}-{resolution}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        exp, judge = self.exp(resolution), self.judge(resolution)
        images, labels = ds.load_arrays()
        fid = class_fidelity(judge, images, labels, bootstrap=1000, seed=0)
        audit = run_audit(ds, exp.real, extractors={"domain": classifier_extractor(judge)}, seed=0,
                          kid_subsets=20, kid_subset_size=min(500, len(labels)))
        overall = audit.overall.fidelity["domain"]
        per_class = {c: {"coverage": sec.fidelity["domain"].coverage, "recall": sec.fidelity["domain"].recall,
                         "ms_ssim": sec.diversity.synthetic_ms_ssim, "real_ms_ssim": sec.diversity.real_ms_ssim,
                         "class_fidelity": fid.per_class_fidelity.get(c)}
                     for c, sec in audit.per_class.items()}
        out = {"class_fidelity": fid.class_fidelity, "class_fidelity_ci95": fid.class_fidelity_ci95,
               "coverage": overall.coverage, "recall": overall.recall, "precision": overall.precision,
               "fd": overall.frechet_distance, "c2st_accuracy": overall.c2st_accuracy,
               "ms_ssim": audit.overall.diversity.synthetic_ms_ssim,
               "real_ms_ssim": audit.overall.diversity.real_ms_ssim, "per_class": per_class,
               "gate_passed": audit.gate.passed, "flagged_share": audit.gate.flagged_share}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out, default=float))
        return json.loads(cache.read_text())  # the same JSON types whether computed now or read back

    def score(self, r: dict[str, Any]) -> dict[str, Any]:
        # the cache key is the configuration, not its label: the same row in two plans is scored once
        cache = WORK / self.domain / "rows" / f"{key_of({k: v for k, v in r.items() if k not in LABELS})}.json"
        labelled = WORK / self.domain / "rows" / f"{key_of(r)}.json"  # rows scored before labels left the key
        for found in (cache, labelled):
            if found.exists():
                return {**json.loads(found.read_text()), **{k: r[k] for k in LABELS}}
        if not (WORK / self.domain / f"train-{r['variant']}.json").exists():
            again = recorded(self.domain, r)
            if again is None:
                raise SystemExit(f"{self.domain}/{r['variant']} is not trained here and no recorded row matches "
                                 f"{r['lever']}={r['value']}: run `bench/science.py train` first")
            return again[0]
        t0 = time.monotonic()
        ds, gen, sample_seconds, resolution = self.synthetic(r)
        quality = self.quality(ds, resolution)
        trtr = self.real_baseline(resolution) if r["recipe"] == DEFAULT_RECIPE else self.classifier(resolution,
                                                                                                     r["recipe"])
        tstr = self.classifier(resolution, r["recipe"], synthetic=ds, real=False)
        mixed = self.classifier(resolution, r["recipe"], synthetic=ds, real=True) if r["mixed"] else None
        out = {**r, "resolution": resolution, "generator_steps": gen.meta.steps_trained, **quality,
               "trtr": trtr, "tstr": tstr, "mixed_result": mixed,
               "tstr_over_trtr": tstr["accuracy"] / trtr["accuracy"],
               "tstr_over_trtr_balanced": tstr["balanced_accuracy"] / trtr["balanced_accuracy"],
               "mixed_over_trtr": mixed["accuracy"] / trtr["accuracy"] if mixed else None,
               "sample_seconds": round(sample_seconds, 1), "seconds": round(time.monotonic() - t0, 1)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out, default=float))
        print(f"[science] {self.domain} {r['lever']}={r['value']}: fidelity {quality['class_fidelity']:.2f} "
              f"coverage {quality['coverage']:.2f} TSTR {tstr['accuracy']:.3f} / TRTR {trtr['accuracy']:.3f} = "
              f"{out['tstr_over_trtr']:.2f}" + (f", mixed {out['mixed_over_trtr']:.2f}" if mixed else ""),
              flush=True)
        return out


def write_grids(ev: Evaluator, rows: list[dict[str, Any]]) -> None:
    """Sample grids of each curve row's synthetic set: beside real test examples in the working folder (real
    images never enter the repository), and synthetic only for the first and last step in bench/results."""
    from bench.common import RESULTS
    from meddiffuse.generate import sample_grid_png

    for i, r in enumerate(rows):
        ds, _, _, resolution = ev.synthetic(r)
        exp = ev.exp(resolution)
        target = WORK / ev.domain / "grids" / f"{ev.domain}-{r['variant']}-{r['generator_steps']}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(sample_grid_png(ds, exp.real, 8))
        r["grid_with_real"] = str(target)
        if i in (0, len(rows) - 1):
            committed = RESULTS / f"science-samples-{ev.domain}-{r['variant']}-{r['generator_steps']}.png"
            committed.write_bytes(sample_grid_png(ds, None, 8))
            r["grid"] = str(committed.relative_to(RESULTS.parents[1]))


def describe_run(t: dict[str, Any]) -> dict[str, Any]:
    """A generator run's record as the results JSON gives it."""
    info, config = t["info"], t["config"]
    return {"overrides": t["overrides"], "steps": info["steps_trained"],
            # seconds and speed of the last session (a resumed run's first part is not in it)
            "seconds": info["seconds"], "images_per_second": info["images_per_second"],
            "resumed_from_step": info["resumed_from_step"],
            "seconds_per_step": round(info["seconds"] / max(1, info["steps_trained"] - (
                info["resumed_from_step"] or 0)), 2),
            "torch_threads": t.get("torch_threads"), "snapshots": t["snapshots"], "ema_variants": t["ema_variants"],
            "preset": config["preset"], "resolution": config["resolution"], "lr_schedule": config["lr_schedule"],
            "ema_decay": config["ema_decay"], "augment_strength": config.get("augment_strength", 0.0),
            "mixed_precision": info.get("mixed_precision", "no")}  # what the run trained in, not what was asked


PER_RUN_PLANS = ("curve", "compute", "diversity", "combined", "guidance")  # plans that follow one generator run


def result_name(plan_name: str, variant: str, domain: str) -> str:
    """The results file of a plan: one per variant for the plans that follow one run (a bf16 run's levers must
    not overwrite the float32 run's), else one per plan."""
    name = f"{plan_name}-{variant}" if plan_name in PER_RUN_PLANS and variant != "base" else plan_name
    return f"science-{name}-{domain}"


def chosen_rows(rows: list[dict[str, Any]], at: list[int] | None = None,
                guidance: list[float] | None = None) -> list[dict[str, Any]]:
    """The plan's rows at these generator steps and guidance scales (None or empty: all), in the plan's order."""
    return [r for r in rows if (not at or r["step"] in at) and (not guidance or r["sampling"]["guidance"] in guidance)]


def same_config(x: dict[str, Any]) -> str:
    """What makes two rows one measurement, as a key (labels and results aside)."""
    return key_of({k: x.get(k) for k in CONFIG_KEYS})


def merged_rows(plan_rows: list[dict[str, Any]], scored: list[dict[str, Any]], runs: dict[str, dict[str, Any]],
                previous: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The plan's rows for its result file: those scored now, and those of the file already there (``previous``)
    that were not, in the plan's order, so that a narrowing filter (``--first``, ``--at``, ``--guidance``) adds
    rows instead of dropping the others. A previous row is kept only when its generator run is the one behind
    this evaluation (the same record in ``runs``): rows of an earlier run under the same variant name go."""
    now = {same_config(r): r for r in scored}
    kept: dict[str, dict[str, Any]] = {}
    for r in (previous or {}).get("rows") or []:
        before = ((previous or {}).get("generator_runs") or {}).get(r.get("variant"))
        if before is not None and runs.get(r.get("variant")) == before:
            kept[same_config(r)] = r
    rows = [now.get(k) or kept[k] for k in map(same_config, plan_rows) if k in now or k in kept]
    return rows, {v: runs[v] for v in dict.fromkeys(r["variant"] for r in rows)}


def run_record(domain: str, r: dict[str, Any]) -> dict[str, Any]:
    """The generator run behind row ``r``: this folder's record, or the recorded row's run."""
    if "recorded_in" in r:
        return {**recorded(domain, r)[1], "recorded_in": r["recorded_in"]}
    return describe_run(trained(domain, r["variant"]))


def cmd_evaluate(a: argparse.Namespace) -> None:
    t0 = time.monotonic()
    if a.snapshots:  # score a running base run's snapshots early (cached for the full evaluation later)
        ev = Evaluator(a.domain)
        for step in a.snapshots:
            ev.score(row("generator steps", step, step=step))
        return
    variant = getattr(a, "variant", "base")
    base = trained(a.domain, variant)
    final = a.step or base["info"]["steps_trained"]
    ev = Evaluator(a.domain)
    planned = plan(a.plan, a.domain, final, variant)
    chosen = chosen_rows(planned, getattr(a, "at", None), getattr(a, "guidance", None))
    if not chosen:  # a filter that matches nothing must not overwrite the plan's result file with no rows
        raise SystemExit(f"no row of plan {a.plan!r} matches --at {getattr(a, 'at', None)} --guidance "
                         f"{getattr(a, 'guidance', None)}; nothing scored or written")
    rows = [ev.score(r) for r in chosen[:getattr(a, "first", None)]]
    runs: dict[str, dict[str, Any]] = {}
    for r in rows:
        runs.setdefault(r["variant"], run_record(a.domain, r))
    if a.plan == "curve":
        write_grids(ev, [r for r in rows if r["lever"] == "generator steps"])
    if a.plan in ("augment", "resolution", "compute"):
        write_grids(ev, [r for r in rows if "recorded_in" not in r])
    from bench.common import RESULTS

    name = result_name(a.plan, variant, a.domain)
    previous = json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").exists() else None
    for v in {p["variant"] for p in planned} - set(runs):  # the runs of rows not scored now, to keep theirs
        if (WORK / a.domain / f"train-{v}.json").exists():
            runs[v] = describe_run(trained(a.domain, v))
        elif previous and v in (previous.get("generator_runs") or {}):  # not here: the file is the only record
            runs[v] = previous["generator_runs"][v]
    rows, runs = merged_rows(planned, rows, runs, previous)
    path = write_result(name, {
        "domain": a.domain, "plan": a.plan, "seed": 0, "arch": ARCH, "classifier_input": 96,
        "split": "20% of each class train / 80% test (seed 0), as bench/study.py",
        "generator_runs": runs,
        "defaults": {"sampling": DEFAULT_SAMPLING, "recipe": DEFAULT_RECIPE},
        "rows": rows, "minutes_total": round((time.monotonic() - t0) / 60, 1),
    })
    print(f"-> {path}")


DOMAINS = ("brain-mri", "all", "covid-ct")
CURVE_PNG = Path(__file__).resolve().parent / "results" / "science-curves.png"


def cmd_plot(_: argparse.Namespace) -> None:
    """bench/results/science-curves.png: per domain, TSTR/TRTR, class fidelity and coverage against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS

    curves = {d: json.loads((RESULTS / f"science-curve-{d}.json").read_text()) for d in DOMAINS
              if (RESULTS / f"science-curve-{d}.json").exists()}
    if not curves:
        raise SystemExit("no science-curve-*.json results to plot: run `bench/science.py evaluate --plan curve`")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), sharex=False)
    metrics = [("tstr_over_trtr", "TSTR ÷ TRTR (accuracy)"), ("class_fidelity", "class fidelity (judge)"),
               ("coverage", "coverage of real train (judge features)")]
    for domain, d in curves.items():
        rows = sorted((r for r in d["rows"] if r["lever"] == "generator steps"), key=lambda r: r["generator_steps"])
        steps = [r["generator_steps"] for r in rows]
        recipe = RESULTS / f"science-recipe-{domain}.json"
        best = json.loads(recipe.read_text())["rows"][0] if recipe.exists() else None
        for ax, (key, _title) in zip(axes, metrics, strict=True):
            line, = ax.plot(steps, [r[key] for r in rows], marker="o", label=f"{domain} (dpmsolver++)")
            if best is not None:  # the recipe's sampler on the final generator
                ax.plot([best["generator_steps"]], [best[key]], marker="*", markersize=13, linestyle="none",
                        color=line.get_color(), label=f"{domain}, cpu-study ({best['sampling']['sampler']}, "
                                                      f"{best['sampling']['per_class']}/class)")
    for ax, (_key, title) in zip(axes, metrics, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generator training steps (cpu-study, 32 px, batch 64)")
        ax.grid(alpha=0.3)
    axes[0].axhline(0.9, color="grey", linestyle="--", linewidth=1, label="goal 0.9")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    first = next(iter(curves.values()))
    m = first.get("machine") or {}
    fig.suptitle(f"One generator run per domain, snapshots of its EMA model (lines: 128 synthetic/class); Lite0 "
                 f"on the synthetic set, "
                 f"scored on the real 80% test split (seed 0). {m.get('cpu_model', '?')}, "
                 f"{m.get('cpu_count', '?')} CPUs, {first.get('date', '?')}.", fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    CURVE_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CURVE_PNG, dpi=110)
    print(f"-> {CURVE_PNG}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one generator variant with snapshots")
    t.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    t.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    t.add_argument("--steps", type=int, help="step budget")
    t.add_argument("--minutes", type=float, help="wall-clock budget instead (equal compute across resolutions)")
    t.add_argument("--snapshots", type=int, nargs="*", default=[])
    t.add_argument("--ema-variants", type=float, nargs="*", default=[])
    e = sub.add_parser("evaluate", help="score a plan's rows and write its result JSON")
    e.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    e.add_argument("--plan", default="curve",
                   choices=["curve", "generator", "sampling", "classifier", "size", "recipe", "training", "augment",
                            "resolution", "diversity", "combined", "guidance", "compute"])
    e.add_argument("--step", type=int, help="the base run's step the levers use (default: its last)")
    e.add_argument("--snapshots", type=int, nargs="*", help="only score these snapshots of a base run in progress")
    e.add_argument("--variant", default="base", choices=sorted(VARIANTS), help="the run a curve follows")
    e.add_argument("--first", type=int, help="score only the plan's first N rows (they come most informative first)")
    e.add_argument("--at", type=int, nargs="*", help="score only the plan's rows at these generator steps")
    e.add_argument("--guidance", type=float, nargs="*", help="score only the plan's rows at these guidance scales")
    sub.add_parser("plot", help="draw bench/results/science-curves.png from the curve results")
    r = sub.add_parser("run", help="train the base run, evaluate its curve, plot (what `make bench-full` runs)")
    r.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--snapshots", type=int, nargs="*", default=[])
    r.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    a = p.parse_args(argv)
    if a.cmd == "run":
        cmd_train(argparse.Namespace(domain=a.domain, variant=a.variant, steps=a.steps, minutes=None,
                                     snapshots=a.snapshots, ema_variants=[0.0]))
        cmd_evaluate(argparse.Namespace(domain=a.domain, plan="curve", step=None, snapshots=None, variant=a.variant))
        cmd_plot(a)
    elif a.cmd == "plot":
        cmd_plot(a)
    elif a.cmd == "evaluate":
        cmd_evaluate(a)
    elif a.cmd == "train":
        if not a.steps and not a.minutes:
            raise SystemExit("give --steps or --minutes")
        cmd_train(a)


if __name__ == "__main__":
    main()
