"""`make demo`: the whole study on phantom data for the three domains, offline, in minutes on a laptop CPU.

Small on purpose: 32 px phantoms, a short generator budget, the offline-pretrained EfficientNet-Lite0.
It ends with each domain's results table and the path of the combined report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from rich.console import Console

from meddiffuse.cli.tables import results_table
from meddiffuse.config import ExperimentConfig, Settings
from meddiffuse.experiment import ExperimentConfigMismatch, run_experiment

DOMAINS = ("brain-mri", "all", "covid-ct")


def demo_config(domain: str, steps: int = 800, minutes: float | None = None, quick: bool = False) -> ExperimentConfig:
    return ExperimentConfig(
        domain=domain,
        name=f"demo-{domain}" + ("-quick" if quick else ""),  # never resume one as the other
        phantoms_per_class=40 if quick else 200,
        resolution=32,
        train_fraction=0.2,
        # the tiny UNet learns phantoms in a couple of minutes on a CPU; cpu-small needs ~10x longer
        generator_preset="tiny",
        # a step budget: the same samples on any machine, however busy (minutes only cap it, if given)
        generator_minutes=None if quick else minutes,
        generator_steps=30 if quick else steps,
        checkpoint_every=10 if quick else 250,
        synthetic_multiple=1.0,
        sampling_steps=10 if quick else 20,
        # the solver the README's demo figures were measured with (the study recipe's default is the SDE one)
        sampler="dpmsolver++",
        archs=["efficientnet_lite0"],
        input_size=64,
        epochs=2 if quick else 12,
        # 40 training images per class: a carved-out val split (4 per class) picks epochs by noise
        val_fraction=0.0,
        early_stopping_patience=None,
        explain_per_model=1 if quick else 2,
        lime_samples=200 if quick else 500,
        bootstrap=200 if quick else 1000,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--steps", type=int, default=800, help="Generator training steps per domain.")
    parser.add_argument("--minutes", type=float, default=None, help="Optional wall-clock cap per generator.")
    parser.add_argument("--quick", action="store_true", help="Seconds-scale smoke run (tests).")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(width=None if sys.stdout.isatty() else 120)  # logs and CI: no 80-column squeeze
    settings = Settings()
    started = time.monotonic()
    tables = []
    for domain in args.domains:
        console.rule(f"[bold]{domain}")
        try:
            out = run_experiment(demo_config(domain, args.steps, args.minutes, args.quick), settings, progress=True,
                                 log=lambda m: console.print(m, highlight=False, markup=False))
        except ExperimentConfigMismatch as exc:
            console.print(f"[red]{exc}[/]\nDelete {settings.home} (or set MEDDIFFUSE_HOME) to start the demo afresh.")
            return 2
        tables.append((domain, out))
    console.rule("[bold]results on unseen real (phantom) test images")
    for domain, out in tables:
        console.print(results_table(out["results"], title=domain))
        console.print(f"report: {out['report']}")
    console.print(f"demo finished in {(time.monotonic() - started) / 60:.1f} min; "
                  f"store {settings.store_uri}, MLflow {settings.resolved_tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
