"""The study's protocol on real images at CPU scale: TRTR, TSTR and mixed, with the audit's figures.

Uses ../shared/data/<domain>/64px (20% train / 80% test per class, fixed seeds), a 32 px `cpu-small`
generator within a fixed wall-clock budget, and two classifiers (the offline-pretrained
EfficientNet-Lite0 and ResNet-18 from scratch) for a fixed number of epochs.
Writes bench/results/study-<domain>.json.

    python bench/study.py --domain brain-mri --minutes 8
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
from meddiffuse.config import ExperimentConfig, Settings  # noqa: E402
from meddiffuse.experiment import Experiment  # noqa: E402
from meddiffuse.report import tstr_ratios  # noqa: E402

SMALL = {"minutes": 8.0, "per_class": 96, "epochs": 8}
FULL = {"minutes": 30.0, "per_class": 256, "epochs": 15}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    p.add_argument("--scale", default="small", choices=["small", "full"])
    p.add_argument("--minutes", type=float, help="generator wall-clock budget")
    p.add_argument("--steps", type=int, help="generator step budget instead (reproducible under CPU contention)")
    p.add_argument("--per-class", type=int, help="synthetic images per class")
    p.add_argument("--epochs", type=int)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sampler", default="dpmsolver++",
                   help="sampler (the published figures used the ODE solver; the recipe's is dpmsolver++-sde)")
    p.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet18"])
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one; reuse it to resume)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    scale = SMALL if a.scale == "small" else FULL
    data = real_data(a.domain)
    if data is None:
        raise SystemExit(f"real images for {a.domain} not found under ../shared/data; nothing to measure")
    work = a.work or Path(tempfile.mkdtemp(prefix=f"bench-study-{a.domain}-"))
    settings = Settings(home=work)
    minutes = a.minutes or scale["minutes"]
    per_class = a.per_class or scale["per_class"]
    probe = Experiment(ExperimentConfig(domain=a.domain, data=data), settings, progress=False, log=lambda m: None)
    probe.ingest()
    n_train = len(probe.real.manifest.select("train"))
    config = ExperimentConfig(
        domain=a.domain, data=data, name=f"bench-{a.domain}", resolution=32, train_fraction=0.2,
        generator_preset="cpu-small", generator_minutes=None if a.steps else minutes, generator_steps=a.steps,
        checkpoint_every=500,
        synthetic_multiple=per_class * probe.domain.num_classes / n_train, guidance=a.guidance, sampler=a.sampler,
        archs=a.archs, epochs=a.epochs or scale["epochs"], input_size=96, explain_per_model=0,
        register_models=False, seed=a.seed,
    )
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
        "domain": a.domain, "scale": a.scale, "results": results,
        "ratios": tstr_ratios(out["results"]),
        "generator": {k: gen.get(k) for k in ("preset", "parameters", "steps", "horizon", "seconds", "final_loss",
                                                "images_per_second")}
        | {"minutes": None if a.steps else minutes, "step_budget": a.steps},
        "synthetic_per_class": per_class, "guidance": a.guidance, "sampler": config.sampler,
        "sampling_steps": config.sampling_steps,
        "resolution": 32, "classifier_input": 96, "epochs": config.epochs, "seed": a.seed,
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
        | {"minutes": None if a.steps else minutes, "step_budget": a.steps},
        "sampling": {"sampler": config.sampler, "steps": config.sampling_steps, "guidance": a.guidance,
                     "per_class": per_class},
        "resolution": 32, "seed": a.seed, "source": "bench/study.py",
    })
    print(f"class fidelity {fid.class_fidelity:.3f} -> {fpath}")


if __name__ == "__main__":
    main()
