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


def cpu_bf16_units() -> str | None:
    """Which native bf16 units the CPU has ("amx", "avx512_bf16") or None: CPUs of one marketing name differ
    (a "Intel(R) Xeon(R) Processor" may have AMX or not), and bf16 training speed depends on it."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


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
