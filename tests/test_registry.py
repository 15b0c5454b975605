"""The model registry on MLflow's SQLite store (a fresh tmp home per test; nothing leaves the machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from meddiffuse.store.registry import (
    CHALLENGER,
    CHAMPION,
    ModelNotFound,
    classifier_model_name,
    describe_version,
    generator_model_name,
    list_versions,
    load_classifier_model,
    promote,
    register_classifier,
    resolve_model_uri,
    set_alias,
    tag_version,
)

DOMAIN = "brain-mri"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
NAME = classifier_model_name(DOMAIN)


OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
NETWORK_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "DATABRICKS_HOST")


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite file with its schema migrated once (about 10 s), copied into each test's home."""
    from mlflow import MlflowClient

    from meddiffuse.config import Settings
    from meddiffuse.store.tracking import configure_mlflow

    with pytest.MonkeyPatch.context() as mp:
        for var in NETWORK_ENV:
            mp.delenv(var, raising=False)
        for var, value in OFFLINE_ENV.items():
            mp.setenv(var, value)
        template = Settings(home=tmp_path_factory.mktemp("mlflow-template"))
        MlflowClient(configure_mlflow(template)).search_experiments()
    return template.home / "mlflow.db"


@pytest.fixture(autouse=True)
def offline_mlflow(settings, monkeypatch, empty_mlflow_db):
    """MLflow on the tmp home's own SQLite file, with every network-reaching extra off."""
    for var in NETWORK_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in OFFLINE_ENV.items():
        monkeypatch.setenv(var, value)
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_mlflow_db, settings.home / "mlflow.db")
    yield
    import mlflow

    while mlflow.active_run() is not None:  # never leak a run into the next test
        mlflow.end_run()


def small_cnn(seed: int, classes: int = len(CLASSES)) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),  # must be off in the export, or outputs would be random
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(24, classes),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval vs train mode shows
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def example(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 16, 16)).astype(np.float32)


def register(model: torch.nn.Module, alias: str | None = None, batch: int = 2, **overrides):
    kwargs = dict(
        domain=DOMAIN,
        classes=CLASSES,
        arch="small-cnn",
        input_example=example(batch),
        train_data="synthetic",
        dataset_ids={"train": "a1b2c3d4e5f60718", "test": "0f1e2d3c4b5a6978"},
        pretrained=None,
        metrics={"tstr_accuracy": 0.81, "trtr_accuracy": 0.9},
        metadata={"mean": [0.5], "std": [0.25], "resolution": 16},
        alias=alias,
    )
    kwargs.update(overrides)
    return register_classifier(model, **kwargs)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


FIXED_BATCH = torch.from_numpy(example(batch=5, seed=42))  # a batch size the example did not have


def test_registered_champion_loads_back_with_identical_outputs():
    model = small_cnn(seed=1)
    model.train()  # registering exports eval-mode behaviour and leaves the caller's mode alone
    info = register(model, alias=CHAMPION)
    assert model.training
    assert (info.name, info.version, info.uri) == (NAME, 1, f"models:/{NAME}/1")

    loaded, metadata = load_classifier_model(f"models:/{NAME}@{CHAMPION}")
    assert torch.equal(outputs(loaded, FIXED_BATCH), outputs(model, FIXED_BATCH))
    assert loaded.classes == CLASSES
    assert metadata["classes"] == CLASSES and metadata["channels"] == 1 and metadata["input_size"] == [16, 16]
    assert metadata["mean"] == [0.5] and metadata["std"] == [0.25]
    assert metadata["model_uri"] == f"models:/{NAME}/1" and metadata["aliases"] == [CHAMPION]

    (version,) = list_versions(NAME)
    assert version.aliases == [CHAMPION]
    assert version.metrics == {"tstr_accuracy": 0.81, "trtr_accuracy": 0.9}
    assert version.tags["architecture"] == "small-cnn"
    assert version.tags["train_data"] == "synthetic"
    assert version.tags["pretrained"] == "none"
    assert version.tags["dataset.train"] == "a1b2c3d4e5f60718"
    assert json.loads(version.tags["classes"]) == CLASSES


def test_promoting_another_version_changes_what_is_loaded():
    first, second = small_cnn(seed=1), small_cnn(seed=2)
    register(first, alias=CHAMPION)
    register(second, alias=CHALLENGER)
    expected_first, expected_second = outputs(first, FIXED_BATCH), outputs(second, FIXED_BATCH)
    assert not torch.equal(expected_first, expected_second)

    champion, _ = load_classifier_model(f"{NAME}@{CHAMPION}")
    assert torch.equal(outputs(champion, FIXED_BATCH), expected_first)
    challenger, _ = load_classifier_model(f"{NAME}@{CHALLENGER}")
    assert torch.equal(outputs(challenger, FIXED_BATCH), expected_second)

    result = promote(NAME, 2)
    assert (result.alias, result.version, result.previous) == (CHAMPION, 2, 1)
    champion, metadata = load_classifier_model(f"models:/{NAME}@{CHAMPION}")
    assert torch.equal(outputs(champion, FIXED_BATCH), expected_second)
    assert metadata["version"] == 2
    pinned, _ = load_classifier_model(f"{NAME}/1")  # a version number still reaches the old one
    assert torch.equal(outputs(pinned, FIXED_BATCH), expected_first)

    aliases = {v.version: v.aliases for v in list_versions(NAME)}
    assert aliases == {2: [CHALLENGER, CHAMPION], 1: []}  # promote moved only the champion alias


def test_moving_the_alias_directly_is_the_same_as_promoting():
    """What the MLflow UI does: set the alias on the registered model, nothing else."""
    from mlflow import MlflowClient

    first, second = small_cnn(seed=1), small_cnn(seed=2)
    register(first, alias=CHAMPION)
    register(second)
    MlflowClient().set_registered_model_alias(NAME, CHAMPION, "2")
    loaded, _ = load_classifier_model(NAME)  # a bare name means @champion
    assert torch.equal(outputs(loaded, FIXED_BATCH), outputs(second, FIXED_BATCH))


def test_batch_one_example_keeps_the_batch_dimension_dynamic():
    model = small_cnn(seed=3)
    register(model, batch=1, alias=CHAMPION)
    loaded, _ = load_classifier_model(f"{NAME}@{CHAMPION}")
    for batch in (1, 3):
        x = FIXED_BATCH[:batch]
        assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_generic_helpers_tag_and_alias_versions():
    register(small_cnn(seed=1))
    tag_version(NAME, 1, {"reviewed_by": "radiology", "fid": 12.5})
    set_alias(NAME, "candidate", 1)
    summary = describe_version(f"{NAME}@candidate")
    assert summary.version == 1
    assert summary.tags["reviewed_by"] == "radiology" and summary.tags["fid"] == "12.5"
    with pytest.raises(ModelNotFound):
        set_alias(NAME, CHAMPION, 7)
    with pytest.raises(ModelNotFound):
        tag_version(NAME, 7, {"a": "b"})


def test_missing_models_versions_and_aliases_raise_model_not_found():
    with pytest.raises(ModelNotFound, match="meddiffuse models list"):
        load_classifier_model(f"{NAME}@{CHAMPION}")
    register(small_cnn(seed=1))
    with pytest.raises(ModelNotFound):
        load_classifier_model(f"{NAME}@{CHAMPION}")  # registered, but nothing is champion yet
    with pytest.raises(ModelNotFound):
        promote(NAME, 5)
    assert [v.version for v in list_versions(NAME)] == [1]


def test_bad_registrations_are_refused_before_logging():
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        register(small_cnn(seed=1, classes=3))
    with pytest.raises(ValueError, match="train_data"):
        register(small_cnn(seed=1), train_data="imagined")
    with pytest.raises(ValueError, match="N x C x H x W"):
        register(small_cnn(seed=1), input_example=np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="finite"):
        register(small_cnn(seed=1), metrics={"tstr_accuracy": float("nan")})
    with pytest.raises(ValueError, match="contradicts"):
        register(small_cnn(seed=1), metadata={"in_chans": 3})
    with pytest.raises(ModelNotFound):
        list_versions(NAME)  # nothing was registered


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


@pytest.mark.parametrize("ref", ["", "name@", "name/x", "name/3/4", "models:/", "a b@champion"])
def test_unreadable_references_are_refused(ref):
    with pytest.raises(ValueError, match="cannot read model reference"):
        resolve_model_uri(ref)


def test_model_names():
    assert classifier_model_name("covid-ct") == "meddiffuse-classifier-covid-ct"
    assert generator_model_name("all") == "meddiffuse-generator-all"
    with pytest.raises(ValueError, match="cannot name a registered model"):
        classifier_model_name("brain/mri")


def test_cli_list_promote_load(tmp_path):
    from meddiffuse.cli import app

    runner = CliRunner()
    first, second = small_cnn(seed=1), small_cnn(seed=2)
    register(first, alias=CHAMPION)
    register(second, metrics={"tstr_accuracy": 0.77})

    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.output)[NAME]
    assert [(v["version"], v["aliases"]) for v in versions] == [(2, []), (1, [CHAMPION])]
    assert versions[0]["metrics"] == {"tstr_accuracy": 0.77}
    table = runner.invoke(app, ["models", "list", "--name", NAME])
    assert table.exit_code == 0 and "small-cnn" in table.output and CHAMPION in table.output

    promoted = runner.invoke(app, ["models", "promote", NAME, "2"])
    assert promoted.exit_code == 0, promoted.output
    assert "was 1" in promoted.output
    assert describe_version(f"{NAME}@{CHAMPION}").version == 2

    out = tmp_path / "exported"
    loaded = runner.invoke(app, ["models", "load", f"{NAME}@{CHAMPION}", "--out", str(out)])
    assert loaded.exit_code == 0, loaded.output
    assert (out / "MLmodel").is_file() and (out / "extra_files" / "preprocessing.json").is_file()
    assert '"version": 2' in loaded.output

    import mlflow.pytorch

    from_folder = mlflow.pytorch.load_model(str(out))
    assert torch.equal(from_folder(FIXED_BATCH), outputs(second, FIXED_BATCH))

    again = runner.invoke(app, ["models", "load", f"{NAME}@{CHAMPION}", "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output

    missing = runner.invoke(app, ["models", "promote", NAME, "9"])
    assert missing.exit_code == 2 and "error" in missing.output


@pytest.mark.parametrize("command", [[], ["list"], ["promote"], ["load"]])
def test_cli_help(command):
    from meddiffuse.cli import app

    result = CliRunner().invoke(app, ["models", *command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output

