"""Shared benchmark plumbing: machine facts, versions and atomic JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine() -> dict[str, Any]:
    import torch

    from meddiffuse.generate.training import cpu_bf16_units  # what the training loop decides bf16 from

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_bf16": cpu_bf16_units(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import importlib.metadata as md

        info["versions"] = {p: md.version(p) for p in ("torch", "diffusers", "timm", "lime", "mlflow")}
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return info


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux /proc/cpuinfo), so timings can be compared across machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    return path


def real_data(domain: str) -> Path | None:
    path = SHARED_DATA / domain / "64px"
    return path if path.is_dir() else None
