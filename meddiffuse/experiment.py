"""The study's protocol end to end, resumable stage by stage.

ingest (20% train / 80% test) → train the generator on the 20% → sample a synthetic set (K × the real
training set, balanced per class; optionally filtered by a real-train classifier) → train each
architecture on real (TRTR), synthetic (TSTR) and real + synthetic (mixed) → evaluate on the real test
split → audit the synthetic set → explain → report.

Every stage commits a marker (``<root>/stages/<stage>.json``) after its outputs; a re-run skips committed
stages, and the long stages (generator training, sampling) resume inside themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from meddiffuse.config import ExperimentConfig, Settings
from meddiffuse.data.dataset import TRAIN_DATA_ORIGINS, Dataset, open_dataset
from meddiffuse.data.ingest import ingest_folder
from meddiffuse.data.phantoms import write_phantom_folder
from meddiffuse.domains import Domain, get_domain
from meddiffuse.report import markdown_table, render_html
from meddiffuse.store import ObjectNotFound, ObjectStore, create_store

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


class ExperimentPaths:
    """Where each artifact of an experiment lives in the store."""

    def __init__(self, name: str) -> None:
        self.root = f"experiments/{name}"

    real = property(lambda self: f"{self.root}/data/real")
    real_test = property(lambda self: f"{self.root}/data/real-test")
    synthetic = property(lambda self: f"{self.root}/data/synthetic")
    synthetic_filtered = property(lambda self: f"{self.root}/data/synthetic-filtered")
    generator = property(lambda self: f"{self.root}/generator")
    audit = property(lambda self: f"{self.root}/audit")
    report = property(lambda self: f"{self.root}/report")

    def classifier(self, arch: str, train_data: str) -> str:
        return f"{self.root}/classifiers/{arch}-{train_data}"

    def stage(self, name: str) -> str:
        return f"{self.root}/stages/{name}.json"

    config = property(lambda self: f"{self.root}/config.json")


# Fields that may change between runs of one experiment: adding architectures or training sets only
# adds stages (their names carry arch and data), and registration does not change any result.
RESUMABLE_CHANGES = frozenset({"name", "archs", "train_data", "register_models", "promote"})
# fields added to ExperimentConfig after experiments were recorded -> the value they implicitly had before
# (not their current default): an old experiment resumes only under the behaviour it was recorded with
ADDED_FIELDS: dict[str, Any] = {"synthetic_per_class": None}


def recorded_config(config: ExperimentConfig) -> dict[str, Any]:
    """The config as an experiment records and compares it: the generator's budget resolved for the domain
    (what the stages ran with), so a recipe's budget for another domain never blocks a resume."""
    out = config.model_dump(mode="json", exclude={"domain_generator_steps"})
    return out | {"generator_steps": config.generator_step_budget}


class ExperimentConfigMismatch(ValueError):
    """The experiment exists with a config whose committed stages the new config would contradict."""


class Experiment:
    """One run of the protocol for one domain. ``run()`` does every stage not yet committed."""

    def __init__(
        self,
        config: ExperimentConfig,
        settings: Settings | None = None,
        store: ObjectStore | None = None,
        progress: bool = False,
        log: Log = logger.info,
    ) -> None:
        self.config = config
        self.settings = settings or Settings()
        self.store = store or create_store(self.settings)
        self.domain: Domain = get_domain(config.domain)
        self.paths = ExperimentPaths(config.experiment_name)
        self.progress = progress
        self.log = log
        self._config_checked = False
        self._validate()

    # -- stage bookkeeping -------------------------------------------------------------------------
    def _validate(self) -> None:
        c = self.config
        if c.data is not None and not Path(c.data).is_dir():
            raise FileNotFoundError(f"--data {c.data} is not a folder")
        if c.test_data is not None and not Path(c.test_data).is_dir():
            raise FileNotFoundError(f"--test-data {c.test_data} is not a folder")
        unknown = set(c.train_data) - set(TRAIN_DATA_ORIGINS)
        if unknown:
            raise ValueError(f"unknown train data {sorted(unknown)}; use {', '.join(TRAIN_DATA_ORIGINS)}")
        from meddiffuse.classify.architectures import check_architecture

        for arch in c.archs:
            check_architecture(arch)

    def done(self, stage: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.get_text(self.paths.stage(stage)))
        except ObjectNotFound:
            return None

    def commit(self, stage: str, info: dict[str, Any]) -> dict[str, Any]:
        info = {"stage": stage, "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **info}
        self.store.put_text(self.paths.stage(stage), json.dumps(info, indent=2, default=str))
        return info

    def check_config(self) -> None:
        """Record the config at the first stage; refuse to resume under one that would contradict it.

        Committed stages are skipped on resume, so resuming with, say, another guidance would silently
        mix old and new results. Only ``RESUMABLE_CHANGES`` may differ.
        """
        if self._config_checked:
            return
        current = recorded_config(self.config)
        try:
            recorded = json.loads(self.store.get_text(self.paths.config))
        except ObjectNotFound:
            self.store.put_text(self.paths.config, json.dumps(current, indent=2, sort_keys=True))
            recorded = current
        # a field added to the config since the experiment was recorded counts as its default (the behaviour
        # the experiment had before the field existed)
        defaults = ExperimentConfig.model_construct().model_dump(mode="json") | ADDED_FIELDS
        recorded = {k: recorded.get(k, defaults.get(k)) for k in set(current) | set(recorded)}
        changed = sorted(k for k in recorded
                         if k not in RESUMABLE_CHANGES and current.get(k) != recorded.get(k))
        if changed:
            shown = ", ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ExperimentConfigMismatch(
                f"experiment {self.config.experiment_name!r} already exists with another config ({shown}); "
                "its finished stages would not match. Use a new --name, or the same settings to resume."
            )
        self._config_checked = True

    def _stage(self, stage: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        self.check_config()
        found = self.done(stage)
        if found is not None:
            self.log(f"[skip] {stage}: done at {found.get('finished')}")
            return found
        self.log(f"[run ] {stage}")
        t0 = time.monotonic()
        info = fn()
        info["seconds"] = round(time.monotonic() - t0, 1)
        return self.commit(stage, info)

    # -- stages ------------------------------------------------------------------------------------
    def ingest(self) -> dict[str, Any]:
        c = self.config

        def run() -> dict[str, Any]:
            data = c.data
            tmp = None
            if data is None:
                tmp = tempfile.TemporaryDirectory(prefix="meddiffuse-phantoms-")
                data = write_phantom_folder(self.domain, Path(tmp.name) / self.domain.name,
                                            c.phantoms_per_class, size=max(64, c.resolution), seed=c.seed)
            try:
                split_mode = "train" if c.test_data is not None else "stratified"
                real, report = ingest_folder(
                    data, self.domain, self.store, self.paths.real, resolution=c.resolution,
                    train_fraction=c.train_fraction, seed=c.seed, max_pixels=self.settings.ingest.max_pixels,
                    split_mode=split_mode,
                )
                info: dict[str, Any] = {"real": real.id, "skipped": len(report.skipped),
                                        "duplicates": len(report.duplicates), "phantoms": c.data is None}
                if c.test_data is not None:
                    used = {e.sha256 for e in real.manifest.entries} | {
                        e.source_sha256 for e in real.manifest.entries if e.source_sha256
                    }
                    test, treport = ingest_folder(
                        c.test_data, self.domain, self.store, self.paths.real_test, resolution=c.resolution,
                        seed=c.seed, split_mode="test", exclude_sha256=used,
                        max_pixels=self.settings.ingest.max_pixels,
                    )
                    info |= {"real_test": test.id, "test_duplicates_removed": len(treport.duplicates)}
                return info
            finally:
                if tmp is not None:
                    tmp.cleanup()

        return self._stage("ingest", run)

    @property
    def real(self) -> Dataset:
        return open_dataset(self.store, self.paths.real)

    @property
    def test_set(self) -> Dataset:
        if self.config.test_data is not None:
            return open_dataset(self.store, self.paths.real_test)
        return self.real

    def train_generator(self) -> dict[str, Any]:
        """Train (resuming) and register the generator on the real training split."""
        from meddiffuse.config import GeneratorRecipe, GeneratorSpec
        from meddiffuse.tasks import train_and_register_generator

        c = self.config

        def run() -> dict[str, Any]:
            spec = GeneratorSpec(
                domain=self.domain.name, dataset=self.paths.real, resolution=c.resolution,
                **{k: getattr(c, k) for k in GeneratorRecipe.model_fields}
                | {"generator_steps": c.generator_step_budget},  # the domain's own budget where the recipe has one
                prefix=self.paths.generator, register_model=c.register_models,
            )
            out = train_and_register_generator(spec, settings=self.settings, store=self.store, progress=self.progress)
            return {"ref": out.prefix, "uri": out.uri, "version": out.version, "alias": out.alias,
                    "steps": out.steps_trained, "parameters": out.parameters, "final_loss": out.final_loss,
                    "images_per_second": out.images_per_second, "stopped_by": out.stopped_by,
                    "preset": out.preset, "horizon": out.horizon, "mixed_precision": out.mixed_precision}

        return self._stage("generator", run)

    def synthesis_spec(self, shard_size: int = 256):
        """The synthetic set as a ``SynthesisSpec``: ``synthetic_per_class`` per class (else K x the real
        training set, balanced per class), from the *pinned* generator version (or its store copy if
        unregistered). Flows map its shards themselves."""
        from meddiffuse.config import SynthesisSpec

        c = self.config
        gen = self._require("generator")
        n_train = len(self.real.manifest.select("train"))
        per_class = c.synthetic_per_class or max(1, math.ceil(c.synthetic_multiple * n_train
                                                              / self.domain.num_classes))
        return SynthesisSpec(
            generator=gen.get("uri") or gen["ref"], per_class=per_class, prefix=self.paths.synthetic,
            sampler=c.sampler, sampling_steps=c.sampling_steps, guidance=c.guidance, seed=c.seed,
            shard_size=shard_size,
            # sampling pads every batch to a fixed width (for bit-exact regeneration); a small set
            # should not pay for 64 rows per call
            batch_size=min(64, max(8, -(-per_class // 8) * 8)),
        )

    def synthesize(self) -> dict[str, Any]:
        """Sample the synthetic set (``synthesis_spec``), resuming from committed shards."""
        from meddiffuse.tasks import synthesize

        def run() -> dict[str, Any]:
            spec = self.synthesis_spec()
            out = synthesize(spec, settings=self.settings, store=self.store)
            return {"synthetic": out.dataset_id, "per_class": spec.per_class, "n": out.n, "generator": out.generator}

        return self._stage("synthesize", run)

    def _require(self, stage: str) -> dict[str, Any]:
        """A stage this one depends on; the protocol (``run``) orders them, so a missing one is a bug."""
        found = self.done(stage)
        if found is None:
            raise RuntimeError(f"stage {stage!r} must run before this one (see Experiment.run for the order)")
        return found

    @property
    def synthetic(self) -> Dataset:
        if self.config.filter_synthetic:
            return open_dataset(self.store, self.paths.synthetic_filtered)
        return open_dataset(self.store, self.paths.synthetic)

    def filter_synthetic(self) -> dict[str, Any]:
        """Keep samples that a classifier trained on the real *training* split assigns to their class."""
        c = self.config

        def run() -> dict[str, Any]:
            from meddiffuse.classify import load_classifier

            arch = c.archs[0]
            self._require(f"classifier-{arch}-real")
            clf = load_classifier(self.paths.classifier(arch, "real"), self.store, self.settings)
            raw = open_dataset(self.store, self.paths.synthetic)
            images, labels = raw.load_arrays()
            probs = clf.optimize_for_inference().predict_proba(images)
            keep = probs[np.arange(len(labels)), labels] >= c.filter_min_confidence
            kept = raw.subset(self.paths.synthetic_filtered, keep,
                              meta={"filtered_by": f"{arch}-real", "min_confidence": c.filter_min_confidence})
            rejection = 1.0 - float(keep.mean())
            per_class = {cls: 1.0 - float(keep[labels == i].mean()) if (labels == i).any() else None
                         for i, cls in enumerate(self.domain.classes)}
            self.log(f"filter: rejected {rejection:.1%} of synthetic images")
            return {"synthetic_filtered": kept.id, "rejection_rate": rejection, "rejection_per_class": per_class}

        return self._stage("filter", run)

    def train_one(self, arch: str, train_data: str) -> dict[str, Any]:
        """Train, evaluate, save and register one classifier (one stage per arch x training data)."""
        from meddiffuse.config import ClassifierRecipe, ClassifierSpec
        from meddiffuse.tasks import train_and_register_classifier

        c = self.config

        def run() -> dict[str, Any]:
            train = []
            if train_data in ("real", "mixed"):
                train.append(self.paths.real)
            if train_data in ("synthetic", "mixed"):
                train.append(self.paths.synthetic_filtered if c.filter_synthetic else self.paths.synthetic)
            spec = ClassifierSpec(
                domain=self.domain.name, arch=arch, train=train, test=self.test_prefix,
                **{k: getattr(c, k) for k in ClassifierRecipe.model_fields},
                prefix=self.paths.classifier(arch, train_data), register_model=c.register_models,
            )
            out = train_and_register_classifier(spec, settings=self.settings, store=self.store, progress=self.progress)
            return out.evaluation | {
                "arch": arch, "train_data": out.train_data, "pretrained": out.pretrained, "n_train": out.n_train,
                "best_epoch": out.best_epoch, "dataset_ids": out.dataset_ids, "model_uri": out.uri,
                "model_version": out.version,
            }

        return self._stage(f"classifier-{arch}-{train_data}", run)

    @property
    def test_prefix(self) -> str:
        return self.paths.real_test if self.config.test_data is not None else self.paths.real

    def promote(self) -> dict[str, Any]:
        """Offer every registered classifier of this run as challenger: ``champion`` moves only to one that
        beats the current champion on this experiment's real test split (``promote_if_better``)."""
        from meddiffuse.tasks import promote_if_better

        c = self.config

        def run() -> dict[str, Any]:
            decisions = []
            for arch in c.archs:
                for train_data in c.train_data:
                    row = self._require(f"classifier-{arch}-{train_data}")
                    if not row.get("model_uri"):
                        continue
                    decision = promote_if_better(row["model_uri"], self.test_prefix, bootstrap=c.bootstrap,
                                                 seed=c.seed, settings=self.settings, store=self.store)
                    self.log(f"promote {arch}-{train_data} ({row['model_uri']}): {decision.reason}")
                    decisions.append(decision.model_dump(mode="json"))
            return {"decisions": decisions}

        return self._stage("promote", run)

    def audit(self) -> dict[str, Any]:
        """Fidelity, diversity and memorisation of the synthetic set, in ImageNet and domain feature space."""

        def run() -> dict[str, Any]:
            from meddiffuse.classify import load_classifier
            from meddiffuse.quality import classifier_extractor, record_audit, run_audit
            from meddiffuse.quality.features import imagenet_extractor

            # the domain space reuses the experiment's own real-train classifier instead of training one
            arch = self.config.archs[0]
            self._require(f"classifier-{arch}-real")
            domain_clf = load_classifier(self.paths.classifier(arch, "real"), self.store, self.settings)
            extractors = {"imagenet": imagenet_extractor(), "domain": classifier_extractor(domain_clf)}
            result = run_audit(self.synthetic, self.real, extractors=extractors, progress=self.progress,
                               seed=self.config.seed, gate_flagged_share=self.config.audit_gate)
            record_audit(result, self.store, self.settings, prefix=self.paths.audit)
            if not result.passed:
                self.log(f"[warn] synthetic data audit FAILED: {result.verdict()}")
            return {"passed": result.passed, "summary": result.verdict(),
                    "flagged_share": result.gate.flagged_share}

        return self._stage("audit", run)

    def explain(self) -> dict[str, Any]:
        """LIME on real test images for every classifier: half right, half wrong where it can."""
        c = self.config

        def run() -> dict[str, Any]:
            from meddiffuse.classify import load_classifier
            from meddiffuse.tasks import explain_images

            test = self.test_set
            entries = test.manifest.select("test")
            rng = np.random.default_rng(c.seed)
            pool = [entries[i] for i in rng.permutation(len(entries))[: max(64, c.explain_per_model * 8)]]
            images, labels = test.load_arrays(entries=pool)
            cards = []
            for arch in c.archs:
                for train_data in c.train_data:
                    self._require(f"classifier-{arch}-{train_data}")
                    clf = load_classifier(self.paths.classifier(arch, train_data), self.store, self.settings)
                    pred = clf.optimize_for_inference().predict(images)
                    right = [i for i in range(len(pool)) if pred[i] == labels[i]]
                    wrong = [i for i in range(len(pool)) if pred[i] != labels[i]]
                    half = c.explain_per_model // 2
                    chosen = wrong[: c.explain_per_model - min(half, len(right))]
                    chosen = right[: c.explain_per_model - len(chosen)] + chosen
                    if not chosen:
                        continue
                    masks = [test.load_mask(pool[i]) for i in chosen]
                    results = explain_images(clf, images[chosen], num_samples=c.lime_samples, seed=c.seed,
                                             masks=masks)
                    for i, res in zip(chosen, results, strict=True):
                        key = f"{self.paths.root}/explanations/{arch}-{train_data}/{pool[i].key.rsplit('/', 1)[-1]}"
                        overlay = key.replace(".png", ".overlay.png")
                        self.store.put(overlay, res.overlay_png)
                        self.store.put_text(key.replace(".png", ".lime.json"),
                                            res.model_dump_json(exclude={"overlay_png"}))
                        cards.append({
                            "model": f"{arch} · {train_data}", "overlay": overlay,
                            "true": self.domain.classes[labels[i]], "pred": self.domain.classes[pred[i]],
                            "correct": bool(pred[i] == labels[i]),
                            "probability": float(res.probabilities[res.explained]),
                            "faithfulness": res.faithfulness, "mask_share": res.mask_share,
                        })
            return {"explanations": cards}

        return self._stage("explain", run)

    def write_report(self, out_dir: Path | None = None) -> dict[str, Any]:
        """Always re-rendered (cheap), so it reflects every committed stage."""
        c = self.config
        results = []
        for arch in c.archs:
            for train_data in c.train_data:
                row = self.done(f"classifier-{arch}-{train_data}")
                if row:
                    results.append({k: v for k, v in row.items() if k not in ("stage", "finished")})
        images: dict[str, bytes] = {}
        grids: list[str] = []
        for key in self.store.list(f"{self.paths.root}/grids/"):
            images[key] = self.store.get(key)
            grids.append(key)
        expl = (self.done("explain") or {}).get("explanations", [])
        for card in expl:
            if self.store.exists(card["overlay"]):
                images[card["overlay"]] = self.store.get(card["overlay"])
        ingest = self.done("ingest") or {}
        real = self.real
        counts = real.manifest.counts()
        datasets = {"real": {"prefix": self.paths.real, "id": real.id,
                             "summary": f"{sum(counts['train'].values())} train / "
                                        f"{sum(counts.get('test', {}).values())} test images"
                                        + (" (phantoms)" if ingest.get("phantoms") else "")}}
        syn_stage = self.done("synthesize")
        if syn_stage:
            datasets["synthetic"] = {"prefix": self.paths.synthetic, "id": syn_stage["synthetic"],
                                     "summary": f"{syn_stage['n']} images, {syn_stage['per_class']} per class, "
                                                f"{c.sampler} {c.sampling_steps} steps, guidance {c.guidance}, "
                                                f"from {syn_stage.get('generator', self.paths.generator)}"}
        gen = self.done("generator")
        audit_stage = self.done("audit")
        audit_html = ""
        if audit_stage:
            try:
                from meddiffuse.quality import audit_html as render_audit
                from meddiffuse.quality import load_audit

                audit_html = render_audit(load_audit(self.store, self.paths.audit))
            except (ImportError, ObjectNotFound):
                audit_html = ""
        notes = []
        filt = self.done("filter")
        if filt:
            notes.append(f"synthetic filter rejected {filt['rejection_rate']:.1%} of samples")
        if any(not r.get("pretrained") for r in results):
            notes.append("some classifiers trained from scratch (no local pretrained weights found)")
        report = {
            "name": c.experiment_name, "domain": self.domain.name, "classes": self.domain.classes,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": c.model_dump(mode="json"), "datasets": datasets, "results": results,
            "generator": {"summary": f"{gen['preset']} preset, {gen['parameters'] / 1e6:.1f}M parameters, "
                                     f"{gen['steps']} steps ({gen['seconds']:.0f} s), final loss "
                                     f"{(gen.get('final_loss') or float('nan')):.4f}"
                                     + (f", registered as {gen['uri'].removeprefix('models:/')} (@{gen['alias']})"
                                        if gen.get("uri") else ""), **gen} if gen else None,
            "audit": audit_stage, "audit_html": audit_html, "grids": grids, "explanations": expl, "notes": notes,
        }
        html_text = render_html(report, images)
        results_json = {k: v for k, v in report.items() if k != "audit_html"}
        md = markdown_table(results)
        self.store.put_text(f"{self.paths.report}/report.html", html_text)
        self.store.put_text(f"{self.paths.report}/results.json", json.dumps(results_json, indent=2, default=str))
        self.store.put_text(f"{self.paths.report}/results.md", md)
        local = out_dir or (self.settings.home / "reports" / c.experiment_name)
        local.mkdir(parents=True, exist_ok=True)
        (local / "report.html").write_text(html_text)
        (local / "results.json").write_text(json.dumps(results_json, indent=2, default=str))
        (local / "results.md").write_text(md)
        return {"report": str(local / "report.html"), "results": results, "markdown": md}

    def sample_grids(self) -> dict[str, Any]:
        """Per class: generated images beside real training examples (taken from the synthetic set)."""

        def run() -> dict[str, Any]:
            from meddiffuse.generate.grid import write_sample_grids

            keys = write_sample_grids(self.store, f"{self.paths.root}/grids",
                                      open_dataset(self.store, self.paths.synthetic), real_dataset=self.real,
                                      per_class=8, seed=self.config.seed)
            return {"grids": list(keys.values())}

        return self._stage("grids", run)

    # -- the protocol ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every stage not yet committed, in dependency order (each stage names what it needs)."""
        c = self.config
        self.ingest()
        needs_synthetic = any(t in ("synthetic", "mixed") for t in c.train_data)
        # the judge of the synthetic filter and the audit's domain features: the first arch on real data
        needs_judge = needs_synthetic and (c.filter_synthetic or c.audit)
        if needs_judge:
            self.train_one(c.archs[0], "real")
        if needs_synthetic:
            self.train_generator()  # needs: ingest
            self.synthesize()  # needs: generator
            self.sample_grids()  # needs: synthesize
            if c.filter_synthetic:
                self.filter_synthetic()  # needs: synthesize, classifier-<arch0>-real
        for arch in c.archs:
            for train_data in c.train_data:
                self.train_one(arch, train_data)  # needs: ingest (+ synthesize / filter)
        if needs_synthetic and c.audit:
            self.audit()  # needs: synthesize, classifier-<arch0>-real
        if c.explain_per_model > 0:
            self.explain()  # needs: every classifier
        if c.register_models and c.promote:
            self.promote()  # needs: every classifier (registered)
        return self.write_report()


def run_experiment(
    config: ExperimentConfig, settings: Settings | None = None, progress: bool = False, log: Log = logger.info
) -> dict[str, Any]:
    """Run (or resume) the study for one domain; returns the report path, results and markdown table."""
    return Experiment(config, settings, progress=progress, log=log).run()
