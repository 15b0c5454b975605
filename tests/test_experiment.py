"""The study end to end on phantoms, at toy scale: stages, disjoint splits, report, resume after a kill."""

from __future__ import annotations

import json
import re

import pytest

from meddiffuse.config import ExperimentConfig
from meddiffuse.experiment import Experiment, ExperimentConfigMismatch


def toy_config(**overrides) -> ExperimentConfig:
    base = dict(
        domain="covid-ct", name="toy", phantoms_per_class=12, resolution=32, train_fraction=0.5,
        generator_preset="tiny", generator_steps=4, generator_minutes=None, checkpoint_every=2,
        synthetic_multiple=1.0, sampling_steps=2, archs=["resnet18"], weights="none", input_size=32,
        epochs=1, early_stopping_patience=None, explain_per_model=1, lime_samples=60, bootstrap=50,
        register_models=True,
    )
    return ExperimentConfig(**(base | overrides))


class Killed(RuntimeError):
    pass


def test_experiment_runs_resumes_and_reports(settings):
    cfg = toy_config()
    seen: list[str] = []

    def die_at_classifiers(msg: str) -> None:
        seen.append(msg)
        if "classifier-resnet18-synthetic" in msg and msg.startswith("[run ]"):
            raise Killed("simulated kill")

    with pytest.raises(Killed):
        Experiment(cfg, settings, progress=False, log=die_at_classifiers).run()
    first = Experiment(cfg, settings, progress=False, log=lambda m: None)
    assert first.done("ingest") and first.done("generator") and first.done("synthesize")
    assert first.done("classifier-resnet18-real") and not first.done("classifier-resnet18-synthetic")

    log: list[str] = []
    out = Experiment(cfg, settings, progress=False, log=log.append).run()
    # finished stages are skipped, the rest run
    assert any(m.startswith("[skip] generator") for m in log)
    assert any(m.startswith("[skip] classifier-resnet18-real") for m in log)
    assert any(m.startswith("[run ] classifier-resnet18-synthetic") for m in log)

    exp = Experiment(cfg, settings, progress=False, log=lambda m: None)
    real, synthetic = exp.real, exp.synthetic
    test_hashes = {e.sha256 for e in real.manifest.select("test")}
    train_hashes = {e.sha256 for e in real.manifest.select("train")}
    assert test_hashes and train_hashes and not test_hashes & train_hashes
    assert not {e.sha256 for e in synthetic.manifest.entries} & test_hashes
    assert all(e.origin.kind == "synthetic" and e.origin.seed is not None for e in synthetic.manifest.entries)
    # K x the real training set, balanced per class
    counts = synthetic.manifest.counts()["train"]
    assert len(set(counts.values())) == 1 and sum(counts.values()) >= len(train_hashes)

    rows = {(r["arch"], r["train_data"]): r for r in out["results"]}
    assert set(rows) == {("resnet18", "real"), ("resnet18", "synthetic"), ("resnet18", "mixed")}
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi
        assert r["n"] == len(test_hashes)
        assert r["pretrained"] is None  # weights="none" is recorded as scratch
    assert rows[("resnet18", "mixed")]["n_train"] == (
        rows[("resnet18", "real")]["n_train"] + rows[("resnet18", "synthetic")]["n_train"]
    )

    html = (settings.home / "reports" / "toy" / "report.html").read_text()
    for section in ("Summary", "Results on unseen real test images", "Confusion matrices",
                    "Synthetic samples beside real examples", "Synthetic data audit",
                    "What the classifiers look at (LIME)", "Configuration"):
        assert section in html, section
    assert "data:image/png;base64," in html  # images inline: the file stands alone
    results = json.loads((settings.home / "reports" / "toy" / "results.json").read_text())
    assert {r["train_data"] for r in results["results"]} == {"real", "synthetic", "mixed"}
    md = (settings.home / "reports" / "toy" / "results.md").read_text()
    assert md.count("| resnet18 |") == 3

    from meddiffuse.registry import classifier_model_name, generator_model_name, list_versions, resolve

    versions = list_versions(classifier_model_name("covid-ct"), settings)
    assert len(versions) == 3
    # the experiment registered its generator and sampled from that pinned version, never an alias
    generator = resolve(generator_model_name("covid-ct") + "@champion", settings)
    assert {e.origin.generator for e in synthetic.manifest.entries} == {generator.uri}
    # champion moved by promote_if_better, with the evidence on every version offered
    decisions = exp.done("promote")["decisions"]
    assert len(decisions) == 3 and decisions[0]["promoted"]  # the first takes the empty alias
    champion = resolve(classifier_model_name("covid-ct") + "@champion", settings).version
    assert champion in {v.version for v in versions}
    assert all("promotion.decision" in v.tags for v in versions)

    # resuming under a config that contradicts the finished stages is refused, naming what changed
    default = ExperimentConfig().guidance
    assert default != 4.0
    with pytest.raises(ExperimentConfigMismatch, match=rf"guidance: {re.escape(str(default))} -> 4\.0"):
        Experiment(toy_config(guidance=4.0), settings, progress=False, log=lambda m: None).run()
    # one that only adds stages (another training set) resumes: nothing finished is redone
    log = []
    Experiment(toy_config(train_data=["real"]), settings, progress=False, log=log.append).run()
    assert not any(m.startswith("[run ]") for m in log)


def test_synthetic_set_size_is_a_number_per_class_or_a_multiple(settings):
    """The recipe samples a fixed number per class; asking for K x the real set means the multiple; an experiment
    recorded before the per-class field existed resumes as the multiple it was made with."""
    import math

    assert ExperimentConfig().synthetic_per_class == 512
    assert ExperimentConfig(synthetic_multiple=2.0).synthetic_per_class is None
    assert ExperimentConfig(synthetic_multiple=2.0, synthetic_per_class=9).synthetic_per_class == 9
    # the doors that merge flags into dumped defaults (both CLIs) apply the same rule to the flags
    from meddiffuse.config import given_overrides, recipe_values

    flags = given_overrides({"synthetic_multiple": 2.0})
    merged = ExperimentConfig().model_dump() | recipe_values("cpu-study") | flags
    assert ExperimentConfig.model_validate(merged).synthetic_per_class is None
    assert given_overrides({"synthetic_per_class": 9}) == {"synthetic_per_class": 9}

    quiet = dict(progress=False, log=lambda m: None)
    exp = Experiment(toy_config(name="size"), settings, **quiet)
    exp.ingest()
    exp.train_generator()
    n_train = len(exp.real.manifest.select("train"))
    assert exp.synthesis_spec().per_class == math.ceil(n_train / 2)
    with pytest.raises(ExperimentConfigMismatch, match=r"synthetic_per_class: None -> 7"):
        Experiment(toy_config(name="size", synthetic_per_class=7), settings, **quiet).check_config()
    fixed = Experiment(toy_config(name="size-fixed", synthetic_per_class=7), settings, **quiet)
    fixed.ingest()
    fixed.train_generator()
    assert fixed.synthesis_spec().per_class == 7

    # a record from before the field: it resumes under the multiple, not under the new default
    recorded = json.loads(exp.store.get_text(exp.paths.config))
    del recorded["synthetic_per_class"]
    exp.store.put_text(exp.paths.config, json.dumps(recorded))
    Experiment(toy_config(name="size"), settings, **quiet).check_config()
    with pytest.raises(ExperimentConfigMismatch, match=r"synthetic_per_class: None -> 512"):
        Experiment(toy_config(name="size", synthetic_per_class=512), settings, **quiet).check_config()


def test_experiment_rejects_bad_requests(settings, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Experiment(toy_config(data=tmp_path / "missing"), settings)
    with pytest.raises(ValueError, match="unknown train data"):
        Experiment(toy_config(train_data=["real", "imagined"]), settings)
    with pytest.raises(ValueError):
        Experiment(toy_config(archs=["not_a_real_net"]), settings)


def test_filtered_synthetic_set_keeps_exactly_what_the_real_trained_judge_accepts(settings):
    import numpy as np

    from meddiffuse.classify import load_classifier
    from meddiffuse.data.dataset import open_dataset

    cfg = toy_config(name="toy-filter", filter_synthetic=True, filter_min_confidence=0.5,
                     train_data=["real", "synthetic"], audit=False, explain_per_model=0, register_models=False)
    Experiment(cfg, settings, progress=False, log=lambda m: None).run()
    exp = Experiment(cfg, settings, progress=False, log=lambda m: None)
    raw = open_dataset(exp.store, exp.paths.synthetic)
    judge = load_classifier(exp.paths.classifier("resnet18", "real"), exp.store, settings)
    images, labels = raw.load_arrays()
    accepted = judge.predict_proba(images)[np.arange(len(labels)), labels] >= 0.5
    kept = {e.key for e in exp.synthetic.manifest.entries}
    assert kept == {e.key for e, a in zip(raw.manifest.entries, accepted, strict=True) if a}
    assert exp.done("filter")["rejection_rate"] == 1.0 - accepted.mean()
    assert exp.synthetic.manifest.meta["filtered_by"] == "resnet18-real"
    assert exp.done("classifier-resnet18-synthetic")["n_train"] == len(kept)


def test_cpu_pair_experiment_registers_pretrained_and_scratch_classifiers(settings):
    """The preset whose registration used to fail: a from-scratch classifier has no fixed input size."""
    from meddiffuse.classify import load_classifier
    from meddiffuse.classify.architectures import resolve_architectures
    from meddiffuse.registry import classifier_model_name, list_versions

    cfg = toy_config(name="toy-pair", archs=resolve_architectures("cpu-pair"), weights="auto", input_size=None,
                     train_data=["real"], audit=False, explain_per_model=0)
    out = Experiment(cfg, settings, progress=False, log=lambda m: None).run()
    rows = {r["arch"]: r for r in out["results"]}
    assert rows["efficientnet_lite0"]["pretrained"] and rows["resnet18"]["pretrained"] is None
    versions = {v.tags["architecture"]: v for v in list_versions(classifier_model_name("covid-ct"), settings)}
    assert set(versions) == {"efficientnet_lite0", "resnet18"}
    scratch = load_classifier(rows["resnet18"]["model_uri"], settings=settings)
    assert scratch.input_size is None and scratch.resolution == 32


def test_the_default_experiment_is_the_cpu_study_recipe_and_recipes_are_named():
    from meddiffuse.config import RECIPES, recipe_values
    from meddiffuse.domains import get_domain
    from meddiffuse.generate import create_generator_config

    default = ExperimentConfig()
    assert {k: getattr(default, k) for k in RECIPES["cpu-study"]} == RECIPES["cpu-study"]
    gpu = ExperimentConfig(**recipe_values("gpu-study"))
    assert gpu.generator_preset == "gpu-base" and gpu.resolution == 64 and gpu.generator_steps > default.generator_steps
    # the CPU recipe keeps its generator within 30 minutes on any CPU (fewer steps where bf16 is not native);
    # the GPU recipe is a step budget only
    assert 0 < default.generator_minutes <= 30 and gpu.generator_minutes is None
    with pytest.raises(ValueError, match="cpu-study"):
        recipe_values("fast")
    # the recipe's generator is cpu-small's UNet on a constant LR: the scaling curve's snapshots are its runs
    brain = get_domain("brain-mri")
    study = create_generator_config("cpu-study", brain, 32)
    assert study.lr_schedule == "constant_with_warmup" and study.mixed_precision == "bf16"
    assert study.fingerprint() == create_generator_config("cpu-small", brain, 32,
                                                          lr_schedule="constant_with_warmup").fingerprint()


def test_a_domain_trains_on_the_recipes_own_budget_unless_a_budget_is_given(settings, monkeypatch):
    """The recipe's step budget per domain (COVID CT 1200, brain MRI 3000), resolved where the domain is final; a
    budget given at any door (constructor, environment, flag, a flow's config) is every domain's."""
    from flows.study import domain_config
    from meddiffuse.config import CPU_STUDY, RECIPES, Settings, given_overrides, recipe_values

    steps, covid = CPU_STUDY["generator_steps"], CPU_STUDY["domain_generator_steps"]["covid-ct"]
    brain = CPU_STUDY["domain_generator_steps"]["brain-mri"]
    assert covid < steps < brain and "all" not in CPU_STUDY["domain_generator_steps"]
    assert ExperimentConfig(domain="covid-ct").generator_step_budget == covid
    assert ExperimentConfig(domain="brain-mri").generator_step_budget == brain
    assert ExperimentConfig(domain="all").generator_step_budget == steps
    assert ExperimentConfig(domain="covid-ct", generator_steps=3000).generator_step_budget == 3000
    assert ExperimentConfig(domain="covid-ct", generator_steps=None).generator_step_budget is None  # minutes alone
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than or equal to 1"):  # the same bound as generator_steps
        ExperimentConfig(domain="covid-ct", domain_generator_steps={"covid-ct": 0})
    assert ExperimentConfig(domain="covid-ct", **recipe_values("gpu-study")).generator_step_budget == (
        RECIPES["gpu-study"]["generator_steps"])  # a CPU-scale finding; the GPU recipe has one budget
    # a multi-domain flow re-validates one config per domain: each gets its own budget, a given one is everyone's
    base = ExperimentConfig(domain="brain-mri")
    domains = ("brain-mri", "all", "covid-ct")
    assert [domain_config(base, d, True).generator_step_budget for d in domains] == [brain, steps, covid]
    given = ExperimentConfig.model_validate(base.model_dump() | given_overrides({"generator_steps": 500}))
    assert [domain_config(given, d, True).generator_step_budget for d in domains] == [500, 500, 500]
    # the trainer service's spec (one domain each): the same default, a given budget kept
    from meddiffuse.config import GeneratorSpec

    assert GeneratorSpec.model_validate_json('{"domain": "covid-ct", "dataset": "d"}').generator_steps == covid
    assert GeneratorSpec(domain="all", dataset="d").generator_steps == steps
    assert GeneratorSpec(domain="brain-mri", dataset="d").generator_steps == brain
    assert GeneratorSpec(domain="covid-ct", dataset="d", generator_steps=3000).generator_steps == 3000
    monkeypatch.setenv("MEDDIFFUSE_EXPERIMENT__GENERATOR_STEPS", "3000")
    assert Settings().experiment.model_copy(update={"domain": "covid-ct"}).generator_step_budget == 3000
    monkeypatch.delenv("MEDDIFFUSE_EXPERIMENT__GENERATOR_STEPS")

    # the generator stage trains on the resolved budget, and the experiment records that budget
    quiet = dict(progress=False, log=lambda m: None)
    exp = Experiment(toy_config(name="budget", domain_generator_steps={"covid-ct": 3}), settings, **quiet)
    exp.ingest()
    assert exp.train_generator()["steps"] == 3
    assert json.loads(exp.store.get_text(exp.paths.config))["generator_steps"] == 3
    with pytest.raises(ExperimentConfigMismatch, match=r"generator_steps: 3 -> 4"):
        Experiment(toy_config(name="budget"), settings, **quiet).check_config()
    # an ALL experiment recorded before budgets per domain existed resumes under the new default
    old = Experiment(ExperimentConfig(domain="all", name="old"), settings, **quiet)
    old.check_config()
    assert "domain_generator_steps" not in json.loads(old.store.get_text(old.paths.config))
    Experiment(ExperimentConfig(domain="all", name="old"), settings, **quiet).check_config()

    # the CLI: COVID CT gets its budget by default, and --generator-steps overrides it (one line, before any work)
    from typer.testing import CliRunner

    from meddiffuse.cli import app

    Experiment(ExperimentConfig(domain="covid-ct", name="door", domain_generator_steps={}), settings,
               **quiet).check_config()  # an experiment made on the flat 2700-step budget
    for flags, shown in (([], f"generator_steps: {steps} -> {covid}"), (["--generator-steps", "2000"],
                                                                        f"generator_steps: {steps} -> 2000")):
        result = CliRunner().invoke(app, ["experiment", "--domain", "covid-ct", "--name", "door", *flags])
        assert result.exit_code != 0 and shown in result.output, result.output
        assert "Traceback" not in result.output


def test_cli_refuses_an_unknown_recipe_in_one_line():
    from typer.testing import CliRunner

    from meddiffuse.cli import app

    result = CliRunner().invoke(app, ["experiment", "--domain", "brain-mri", "--recipe", "fast"])
    assert result.exit_code != 0
    assert "unknown recipe 'fast'" in result.output and "cpu-study" in result.output
    assert "Traceback" not in result.output
