"""The study's protocol on real images at CPU scale: TRTR, TSTR and mixed, with the audit's figures.

Uses ../shared/data/<domain>/64px (20% train / 80% test per class, fixed seeds) and runs the product's
`Experiment` with a named recipe (default `cpu-study`, the default of `meddiffuse experiment`): its
generator preset and step budget, sampler, guidance, synthetic set size and classifier recipe. Any flag
overrides the recipe (the small `python -m bench` scale uses smaller budgets). Writes
bench/results/study-<domain>.json and class-fidelity-<domain>.json.

    python bench/study.py --domain brain-mri                      # the recipe
    python bench/study.py --domain brain-mri --steps 700 --per-class 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import real_data, write_result  # noqa: E402
from meddiffuse.config import RECIPES, ExperimentConfig, Settings, given_overrides, recipe_values  # noqa: E402
from meddiffuse.experiment import Experiment  # noqa: E402
from meddiffuse.report import tstr_ratios  # noqa: E402

CLASSIFIER_KEYS = ("epochs", "val_fraction", "ema_decay", "augmentation_strength", "mixup", "cutmix", "lr")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    p.add_argument("--recipe", default="cpu-study", choices=sorted(RECIPES), help="the budgets and settings")
    p.add_argument("--minutes", type=float, help="a generator wall-clock cap instead of the recipe's steps")
    p.add_argument("--steps", type=int, help="generator step budget (default: the recipe's)")
    p.add_argument("--per-class", type=int, help="synthetic images per class (default: the recipe's)")
    p.add_argument("--epochs", type=int, help="classifier epochs (default: the recipe's)")
    p.add_argument("--guidance", type=float, help="default: the recipe's")
    p.add_argument("--sampler", help="default: the recipe's (the figures before 2026-12-06 used dpmsolver++)")
    p.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet18"])
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one; reuse it to resume)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    data = real_data(a.domain)
    if data is None:
        raise SystemExit(f"real images for {a.domain} not found under ../shared/data; nothing to measure")
    work = a.work or Path(tempfile.mkdtemp(prefix=f"bench-study-{a.domain}-"))
    settings = Settings(home=work)
    flags = {k: v for k, v in {"generator_steps": a.steps, "generator_minutes": a.minutes,
                                 "synthetic_per_class": a.per_class, "epochs": a.epochs, "guidance": a.guidance,
                                 "sampler": a.sampler}.items() if v is not None}
    if a.minutes is not None and a.steps is None:
        flags["generator_steps"] = None  # a wall-clock budget alone
    values = recipe_values(a.recipe) | given_overrides(flags)  # a given --steps is every domain's budget
    values.setdefault("resolution", 32)
    config = ExperimentConfig(
        domain=a.domain, data=data, name=f"bench-{a.domain}", train_fraction=0.2, checkpoint_every=500,
        archs=a.archs, input_size=96, explain_per_model=0, register_models=False, seed=a.seed, **values,
    )
    per_class = config.synthetic_per_class
    t0 = time.monotonic()
    out = Experiment(config, settings, log=print).run()
    exp = Experiment(config, settings, progress=False, log=lambda m: None)
    audit = exp.done("audit") or {}
    audit_full = None
    if exp.store.exists(f"{exp.paths.audit}/audit.json"):
        audit_full = json.loads(exp.store.get_text(f"{exp.paths.audit}/audit.json"))
    gen = exp.done("generator") or {}
    results = [
        {k: r.get(k) for k in ("arch", "train_data", "accuracy", "balanced_accuracy", "macro_f1", "auc",
                               "accuracy_ci95", "balanced_accuracy_ci95", "macro_f1_ci95", "n_train", "n",
                               "pretrained")}
        for r in out["results"]
    ]
    path = write_result(f"study-{a.domain}", {
        "domain": a.domain, "results": results,
        "ratios": tstr_ratios(out["results"]),
        "generator": {k: gen.get(k) for k in ("preset", "parameters", "steps", "horizon", "seconds", "final_loss",
                                                "images_per_second", "mixed_precision", "stopped_by")}
        | {"minutes": config.generator_minutes, "step_budget": config.generator_step_budget},
        "recipe": a.recipe, "overrides": flags,
        "synthetic_per_class": per_class, "guidance": config.guidance, "sampler": config.sampler,
        "sampling_steps": config.sampling_steps,
        "resolution": config.resolution, "classifier_input": 96, "epochs": config.epochs,
        "classifier": {k: getattr(config, k) for k in CLASSIFIER_KEYS}, "seed": a.seed,
        "audit": {"passed": audit.get("passed"), "summary": audit.get("summary"), "details": audit_full},
        "minutes_total": round((time.monotonic() - t0) / 60, 1), "report": out["report"],
    })
    print(out["markdown"])
    print(f"-> {path}")
    # class fidelity from the same run: the real-trained classifier judges each generated image's class
    from meddiffuse.classify import load_classifier
    from meddiffuse.quality.class_fidelity import class_fidelity

    judge = load_classifier(exp.paths.classifier(a.archs[0], "real"), exp.store, settings)
    images, labels = exp.synthetic.load_arrays()
    fid = class_fidelity(judge, images, labels, bootstrap=1000, seed=a.seed)
    trtr = next(r for r in results if r["arch"] == a.archs[0] and r["train_data"] == "real")
    fpath = write_result(f"class-fidelity-{a.domain}", {
        "domain": a.domain, **fid.model_dump(mode="json", exclude={"n"}),
        "judge": f"{a.archs[0]} trained on the real 20%", "judge_accuracy_on_real_test": trtr["accuracy"],
        "generator": {k: gen.get(k) for k in ("preset", "parameters", "steps", "seconds")}
        | {"minutes": config.generator_minutes, "step_budget": config.generator_step_budget},
        "sampling": {"sampler": config.sampler, "steps": config.sampling_steps, "guidance": config.guidance,
                     "per_class": per_class},
        "recipe": a.recipe, "resolution": config.resolution, "seed": a.seed, "source": "bench/study.py",
    })
    print(f"class fidelity {fid.class_fidelity:.3f} -> {fpath}")


if __name__ == "__main__":
    main()
