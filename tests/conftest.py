"""Shared fixtures: every test gets its own embedded home (store, MLflow) under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time, tests included

try:  # property tests: the same examples every run, so CI is never red by the luck of the draw
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("deterministic", derandomize=True, database=None)
    _hypothesis_settings.load_profile("deterministic")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings whose embedded home is a fresh temporary folder (env vars cleared)."""
    from meddiffuse.config import Settings

    for key in list(os.environ):
        if key.startswith("MEDDIFFUSE_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("MEDDIFFUSE_HOME", str(home))
    return Settings(home=home)


@pytest.fixture
def store(settings):
    from meddiffuse.store import create_store

    return create_store(settings)


@pytest.fixture
def brain_phantoms(store):
    """A small committed brain-mri phantom Dataset at 32 px (16 per class, half train)."""
    from meddiffuse.data.phantoms import phantom_dataset

    return phantom_dataset(store, "datasets/brain-phantom", "brain-mri", n_per_class=16, resolution=32)


def shared_data(domain: str, sub: str = "64px") -> Path:
    """Path to ../shared/data/<domain>/<sub>, or skip the test with the reason."""
    path = SHARED_DATA / domain / sub
    if not path.is_dir():
        pytest.skip(f"real images not available: {path} is absent (see ../shared/data/README.md)")
    return path
