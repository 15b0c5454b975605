"""Cold start of `meddiffuse models list`: this tree against another checkout (before), side by side.

Both commands read the same registry (an MLflow SQLite store with one registered model) in fresh
processes, alternating, so machine load hits both alike; the median of each and their ratio are recorded.

    python bench/cli_startup.py --before /tmp/meddiffuse-before   # a checkout of the earlier commit
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "import sys; from meddiffuse.cli import main; sys.argv = ['meddiffuse', 'models', 'list']; main()"


def git_commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def seed_registry(home: Path) -> None:
    """One registered model, written with MLflow's client directly (no torch needed)."""
    env = {**os.environ, "MEDDIFFUSE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    code = ("from meddiffuse.registry import registry_client; from meddiffuse.config import Settings; "
            "c = registry_client(Settings()); c.create_registered_model('meddiffuse-classifier-brain-mri'); "
            "c.create_model_version('meddiffuse-classifier-brain-mri', source='/tmp/none')")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def time_once(tree: Path, home: Path) -> float:
    env = {**os.environ, "MEDDIFFUSE_HOME": str(home), "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", COMMAND], env=env, cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0 or "meddiffuse-classifier-brain-mri" not in out.stdout:
        raise SystemExit(f"`models list` failed in {tree}: {out.stderr[-500:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="A checkout of the earlier code.")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        seed_registry(home)
        runs: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(a.repeats):
            runs["before"].append(time_once(a.before, home))
            runs["after"].append(time_once(ROOT, home))
    med = {k: statistics.median(v) for k, v in runs.items()}
    path = write_result("cli-startup", {
        "command": "meddiffuse models list (cold process, SQLite registry with one model)",
        "before_commit": git_commit(a.before), "after_commit": git_commit(ROOT), "repeats": a.repeats,
        "seconds": runs, "median_seconds": med, "speedup": med["before"] / med["after"],
    })
    print(f"before {med['before']:.2f} s, after {med['after']:.2f} s ({med['before'] / med['after']:.1f}x): {path}")


if __name__ == "__main__":
    main()
