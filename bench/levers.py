"""What moves TSTR at CPU scale: synthetic-set size, guidance, and filtering by a real-trained judge.

One generator (the study's protocol: `cpu-small`, 32 px, a step budget) is trained on the real 20%
training split of ../shared/data/<domain>/64px; then, for each guidance, one pool of synthetic images
is sampled (fixed per-image seeds, so the first N per class of a pool are the same images at any pool
size) and EfficientNet-Lite0 (offline ImageNet weights, 96 px) is trained on subsets of it:

  first-N   the first N samples per class, as the study uses them
  top-N     the N per class that the judge (Lite0 trained on the real 20%) is most confident are their
            class, out of the whole pool: rejection sampling by a classifier
  agree     every sample whose judge prediction is its own class (unbalanced)

Each is scored on the real 80% test split. Writes bench/results/levers-<domain>.json.

    python bench/levers.py --domain brain-mri --steps 700 --pool 192 --sizes 64 192 --guidance 2 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import real_data, write_result  # noqa: E402
from meddiffuse.classify import create_classifier, evaluate, load_classifier, train_classifier  # noqa: E402
from meddiffuse.config import ExperimentConfig, Settings  # noqa: E402
from meddiffuse.experiment import Experiment  # noqa: E402
from meddiffuse.generate import generate_dataset, load_generator  # noqa: E402

ARCH = "efficientnet_lite0"


def subset_mask(kind: str, n: int | None, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Which pool images a subset keeps (pool order is class, then per-image seed index)."""
    keep = np.zeros(len(labels), dtype=bool)
    confidence = probs[np.arange(len(labels)), labels]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if kind == "first":
            keep[idx[:n]] = True
        elif kind == "top":
            keep[idx[np.argsort(-confidence[idx], kind="stable")[:n]]] = True
        elif kind == "agree":
            keep[idx[probs[idx].argmax(axis=1) == c]] = True
        else:
            raise ValueError(f"unknown subset kind {kind!r}")
    return keep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    p.add_argument("--steps", type=int, default=700, help="generator step budget")
    p.add_argument("--pool", type=int, default=192, help="synthetic images per class sampled per guidance")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 192], help="first-N subsets")
    p.add_argument("--top", type=int, nargs="*", default=[64], help="judge top-N subsets (N < pool)")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--sampler", default="dpmsolver++",
                   help="sampler (the published figures used the ODE solver; the recipe's is dpmsolver++-sde)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--work", type=Path, help="working folder (reuse it to resume)")
    p.add_argument("--name", help="experiment name in the working folder (default levers-<domain>)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = real_data(a.domain)
    if data is None:
        raise SystemExit(f"real images for {a.domain} not found under ../shared/data; nothing to measure")
    if any(n > a.pool for n in [*a.sizes, *a.top]):
        raise SystemExit("subset sizes must not exceed --pool")
    t_start = time.monotonic()
    work = a.work or Path(tempfile.mkdtemp(prefix=f"bench-levers-{a.domain}-"))
    settings = Settings(home=work)
    config = ExperimentConfig(
        domain=a.domain, data=data, name=a.name or f"levers-{a.domain}", resolution=32, train_fraction=0.2,
        generator_preset="cpu-small", generator_minutes=None, generator_steps=a.steps, checkpoint_every=500,
        archs=[ARCH], epochs=a.epochs, input_size=96, explain_per_model=0, register_models=False, seed=a.seed,
    )
    exp = Experiment(config, settings, log=print)
    exp.ingest()
    gen_info = exp.train_generator()
    judge_row = exp.train_one(ARCH, "real")
    judge = load_classifier(exp.paths.classifier(ARCH, "real"), exp.store, settings).optimize_for_inference()
    gen = load_generator(exp.paths.generator, exp.store, settings)

    rows: list[dict[str, Any]] = []
    pools: list[dict[str, Any]] = []
    for guidance in a.guidance:
        t0 = time.monotonic()
        pool = generate_dataset(gen, exp.store, f"{exp.paths.root}/pools/g{guidance:g}-n{a.pool}", a.pool,
                                sampler=a.sampler, guidance=guidance, seed=a.seed, batch_size=64, progress=True)
        sample_s = time.monotonic() - t0
        images, labels = pool.load_arrays()
        probs = judge.predict_proba(images)
        fidelity = float((probs.argmax(axis=1) == labels).mean())
        print(f"[levers] guidance {guidance:g}: {len(labels)} samples in {sample_s:.0f} s, "
              f"class fidelity {fidelity:.3f}", flush=True)
        specs = [("first", n) for n in a.sizes] + [("top", n) for n in a.top] + [("agree", None)]
        for kind, n in specs:
            keep = subset_mask(kind, n, labels, probs)
            name = f"{kind}-{n}" if n else kind
            ds = pool.subset(f"{exp.paths.root}/subsets/g{guidance:g}-{name}", keep)
            t1 = time.monotonic()
            clf = create_classifier(ARCH, exp.domain.num_classes, exp.domain.channels, input_size=96,
                                    classes=exp.domain.classes, seed=a.seed)
            train_classifier(clf, ds, domain=exp.domain, epochs=a.epochs, batch_size=config.batch_size,
                             lr=config.lr, early_stopping_patience=config.early_stopping_patience, seed=a.seed,
                             progress=False)
            r = evaluate(clf, exp.test_set, "test", bootstrap=1000, seed=a.seed)
            row = {"guidance": guidance, "subset": name, "kind": kind, "per_class": n, "n_train": int(keep.sum()),
                   "set_class_fidelity": float((probs[keep].argmax(axis=1) == labels[keep]).mean()),
                   "accuracy": r.accuracy, "accuracy_ci95": list(r.accuracy_ci95 or []),
                   "balanced_accuracy": r.balanced_accuracy, "macro_f1": r.macro_f1,
                   "tstr_over_trtr": r.accuracy / judge_row["accuracy"],
                   "train_seconds": round(time.monotonic() - t1, 1)}
            rows.append(row)
            print(f"[levers] g{guidance:g} {name:10s} n={row['n_train']:4d} acc {r.accuracy:.3f} "
                  f"({row['tstr_over_trtr']:.2f} x TRTR)", flush=True)
        pools.append({"guidance": guidance, "n": len(labels), "class_fidelity": fidelity,
                      "sampling_seconds": round(sample_s, 1)})

    path = write_result(f"levers-{a.domain}", {
        "domain": a.domain, "seed": a.seed, "arch": ARCH, "classifier_input": 96, "epochs": a.epochs,
        "generator": {k: gen_info.get(k) for k in ("preset", "parameters", "steps", "horizon", "seconds",
                                                    "final_loss", "images_per_second")},
        "resolution": 32, "pool_per_class": a.pool, "sampler": a.sampler, "sampling_steps": 20,
        "trtr": {k: judge_row.get(k) for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "n_train")},
        "pools": pools, "results": rows, "minutes_total": round((time.monotonic() - t_start) / 60, 1),
    })
    print(f"-> {path}")


if __name__ == "__main__":
    main()
