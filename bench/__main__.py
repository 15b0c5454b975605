"""Run the benchmarks one after another, each in its own process, then render the README's tables.

    python -m bench --scale small                  # `make bench`: under 90 minutes on 2 CPU cores
    python -m bench --scale full                   # `make bench-full`: larger budgets, the GPU if present
    python -m bench --only sampling train-speed    # a subset (names or groups: study, class-fidelity)
    python -m bench --list                         # the plan with each benchmark's budget

A failing benchmark is reported and the runner goes on; it exits non-zero at the end if any failed. A
benchmark counts as passed only if it exits 0 *and* rewrote its JSON in bench/results/. A full run (no
--only) also writes bench/results/runner-<scale>.json with the timings, which the README shows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SMALL_LIMIT_MINUTES = 90.0


@dataclass(frozen=True)
class Benchmark:
    name: str  # also the result file's stem: bench/results/<name>.json
    script: str
    args: dict[str, list[str]]  # scale -> arguments
    expected_minutes: dict[str, float]  # scale -> what the budget below should take on 2 CPU cores
    optional: bool = False  # skipped (not failed) when the script is absent
    flags_required: tuple[str, ...] = field(default=())  # args only passed if the script knows these flags
    scales: tuple[str, ...] = ("small", "full")  # where a plain run includes it (--only runs it anywhere)

    def command(self, scale: str) -> list[str]:
        args = self.args.get(scale, [])
        if self.flags_required:
            source = (BENCH / self.script).read_text() if (BENCH / self.script).exists() else ""
            if not all(f'"{flag}"' in source for flag in self.flags_required):
                args = []
        return [sys.executable, str(BENCH / self.script), *args]


# Small-scale budgets (2 CPU cores): the studies dominate. Step budgets (not minutes) so that a result does
# not depend on what else the machine is doing; the rest (sampler, classifier recipe) is the `cpu-study`
# recipe's. The full scale is the recipe itself (1200 steps, 512 per class): what `meddiffuse experiment` runs.
STUDY_SMALL = ["--per-class", "128", "--archs", "efficientnet_lite0", "resnet18"]
STUDY_FULL = ["--archs", "efficientnet_lite0"]
BENCHMARKS: list[Benchmark] = [
    Benchmark("study-brain-mri", "study.py",
              {"small": ["--domain", "brain-mri", "--steps", "700", *STUDY_SMALL],
               "full": ["--domain", "brain-mri", *STUDY_FULL]},
              {"small": 17, "full": 60}),
    Benchmark("study-all", "study.py",
              {"small": ["--domain", "all", "--steps", "700", *STUDY_SMALL],
               "full": ["--domain", "all", *STUDY_FULL]},
              {"small": 16, "full": 60}),
    Benchmark("study-covid-ct", "study.py",
              {"small": ["--domain", "covid-ct", "--steps", "500", *STUDY_SMALL],
               "full": ["--domain", "covid-ct", *STUDY_FULL]},
              {"small": 11, "full": 40}),
    Benchmark("class-fidelity-phantom-brain-mri", "class_fidelity.py",
              {"small": ["--domain", "phantom-brain-mri", "--minutes", "2", "--per-class", "32", "--epochs", "8"],
               "full": ["--domain", "phantom-brain-mri", "--minutes", "10", "--per-class", "128", "--epochs", "8"]},
              {"small": 5, "full": 15}),
    # class fidelity on real brain-mri comes from study-brain-mri (same generator, same judge)
    Benchmark("sampling", "sampling.py", {"small": ["--scale", "small"], "full": ["--scale", "full"]},
              {"small": 18, "full": 60}),
    Benchmark("explain", "explain.py", {"small": [], "full": ["--images", "24", "--repeats", "3"]},
              {"small": 4, "full": 20}, optional=True, flags_required=("--images", "--repeats")),
    Benchmark("train-speed", "train_speed.py", {"small": ["--scale", "small"], "full": ["--scale", "full"]},
              {"small": 8, "full": 20}),
    # the explainer over HTTP (bentoml serve) against the same work in-process: 1000 /predict, 200 /explain
    Benchmark("serve", "serve.py", {"small": [], "full": []}, {"small": 6, "full": 6}),
    # the scaling curves of the cpu-study recipe (one generator run per domain, snapshots scored): long, so
    # `make bench-full` only; the levers run as `bench/science.py evaluate --plan size|sampling|classifier|generator`
    Benchmark("science-curve-brain-mri", "science.py",
              {"full": ["run", "--domain", "brain-mri", "--steps", "1200", "--snapshots", "300", "750"]},
              {"full": 60}, scales=("full",)),
    Benchmark("science-curve-all", "science.py",
              {"full": ["run", "--domain", "all", "--steps", "1200", "--snapshots", "300", "600", "900"]},
              {"full": 65}, scales=("full",)),
    Benchmark("science-curve-covid-ct", "science.py",
              {"full": ["run", "--domain", "covid-ct", "--steps", "600", "--snapshots", "200", "400"]},
              {"full": 35}, scales=("full",)),
    # the levers behind the study's TSTR (set size, guidance, judge filtering): ~25 min, so not in `make bench`
    Benchmark("levers-brain-mri", "levers.py",
              {"small": ["--domain", "brain-mri", "--steps", "700"],
               "full": ["--domain", "brain-mri", "--steps", "2000", "--pool", "512", "--sizes", "64", "192", "512",
                        "--top", "192"]},
              {"small": 25, "full": 90}, scales=("full",)),
]


def select(benchmarks: list[Benchmark], only: list[str] | None, scale: str = "small") -> list[Benchmark]:
    """Benchmarks named in ``only`` (exact names, or groups: 'study' matches 'study-brain-mri'); else the scale's."""
    if not only:
        return [b for b in benchmarks if scale in b.scales]
    wanted = [b for b in benchmarks if any(b.name == o or b.name.startswith(f"{o}-") for o in only)]
    unknown = [o for o in only if not any(b.name == o or b.name.startswith(f"{o}-") for b in benchmarks)]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {[b.name for b in benchmarks]}")
    return wanted


def run_one(bench: Benchmark, scale: str, timeout_factor: float | None) -> dict:
    result_file = BENCH / "results" / f"{bench.name}.json"
    record = {"name": bench.name, "expected_minutes": bench.expected_minutes.get(scale), "ok": False,
              "minutes": None, "status": ""}
    if not (BENCH / bench.script).exists():
        record["status"] = "skipped: script absent" if bench.optional else "failed: script absent"
        record["ok"] = None if bench.optional else False
        return record
    cmd = bench.command(scale)
    print(f"\n[bench] === {bench.name}: bench/{bench.script} {' '.join(cmd[2:])}", flush=True)
    timeout = None
    if timeout_factor and bench.expected_minutes.get(scale):
        timeout = bench.expected_minutes[scale] * 60 * timeout_factor
    before = result_file.stat().st_mtime if result_file.exists() else None
    t0 = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout).returncode
        status = f"exit {rc}"
    except subprocess.TimeoutExpired:
        rc, status = None, f"timed out after {timeout / 60:.0f} min"
    except OSError as exc:
        rc, status = None, f"could not start: {exc}"
    record["minutes"] = round((time.monotonic() - t0) / 60, 2)
    written = result_file.exists() and (before is None or result_file.stat().st_mtime > before)
    record["ok"] = rc == 0 and written
    record["status"] = "ok" if record["ok"] else (status if rc != 0 else "exit 0 but no new result JSON")
    print(f"[bench] === {bench.name}: {record['status']} in {record['minutes']:.1f} min", flush=True)
    return record


def summary(records: list[dict], total: float, limit: float | None) -> str:
    lines = [f"{'benchmark':36s} {'status':34s} {'minutes':>8s} {'expected':>9s}"]
    for r in records:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        expected = "-" if r["expected_minutes"] is None else f"{r['expected_minutes']:.0f}"
        lines.append(f"{r['name']:36s} {r['status'][:34]:34s} {minutes:>8s} {expected:>9s}")
    lines.append(f"{'total':36s} {'':34s} {total:8.1f} " + (f"{'limit ' + format(limit, '.0f'):>9s}" if limit else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="small", choices=["small", "full"])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (or groups)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--no-render", action="store_true", help="do not rewrite the README's tables at the end")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="kill a benchmark after this many times its expected minutes (0: never; full: never)")
    a = p.parse_args(argv)
    plan = select(BENCHMARKS, a.only, a.scale)
    if a.list:
        for b in plan:
            shown = " ".join([f"bench/{b.script}", *b.command(a.scale)[2:]])
            print(f"{b.name:36s} ~{b.expected_minutes.get(a.scale, 0):4.0f} min  {shown}")
        print(f"{'expected total':36s} ~{sum(b.expected_minutes.get(a.scale, 0) for b in plan):4.0f} min")
        return 0
    factor = a.timeout_factor if a.scale == "small" and a.timeout_factor > 0 else None
    t0 = time.monotonic()
    records = [run_one(b, a.scale, factor) for b in plan]
    total = (time.monotonic() - t0) / 60
    limit = SMALL_LIMIT_MINUTES if a.scale == "small" else None
    print("\n[bench] summary\n" + summary(records, total, limit), flush=True)
    if limit and total > limit:
        print(f"[bench] WARNING: the {a.scale} scale took {total:.0f} min, over its {limit:.0f}-minute limit",
              flush=True)
    if not a.only:
        sys.path.insert(0, str(ROOT))
        from bench.common import write_result

        write_result(f"runner-{a.scale}", {"scale": a.scale, "benchmarks": records, "minutes_total": round(total, 1),
                                           "limit_minutes": limit})
    if not a.no_render:
        rc = subprocess.run([sys.executable, str(BENCH / "render.py")], cwd=ROOT).returncode
        if rc != 0:
            print("[bench] rendering the README failed", flush=True)
            records.append({"name": "render", "ok": False})
    failed = [r["name"] for r in records if r["ok"] is False]
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
