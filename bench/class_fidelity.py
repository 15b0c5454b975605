"""Class fidelity of the generator: can a classifier trained on *real* images recognise the class that
each generated image was conditioned on?

Trains the `cpu-small` generator on the real 20% training split within a fixed wall-clock budget,
samples a balanced set, and scores it with a classifier trained on the same real training split.
Writes bench/results/class-fidelity-<domain>.json with {"domain", "class_fidelity", ...}.

    python bench/class_fidelity.py --domain brain-mri --minutes 10
    python bench/class_fidelity.py --domain phantom-brain-mri --minutes 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import real_data, write_result  # noqa: E402
from meddiffuse.classify import create_classifier, evaluate, train_classifier  # noqa: E402
from meddiffuse.config import Settings  # noqa: E402
from meddiffuse.data.ingest import ingest_folder  # noqa: E402
from meddiffuse.data.phantoms import write_phantom_folder  # noqa: E402
from meddiffuse.domains import get_domain  # noqa: E402
from meddiffuse.generate import create_generator_config, load_generator, train_generator  # noqa: E402
from meddiffuse.quality.class_fidelity import class_fidelity  # noqa: E402
from meddiffuse.store import LocalStore  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="brain-mri", help="brain-mri | all | covid-ct | phantom-<domain>")
    p.add_argument("--minutes", type=float, default=10.0, help="generator wall-clock budget")
    p.add_argument("--steps", type=int, help="generator step budget (reproducible under CPU contention)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--per-class", type=int, default=64, help="generated images per class")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sampler", default="dpmsolver++",
                   help="sampler (the published figures used the ODE solver; the recipe's is dpmsolver++-sde)")
    p.add_argument("--epochs", type=int, default=8, help="real-image classifier epochs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    phantom = a.domain.startswith("phantom-")
    domain = get_domain(a.domain.removeprefix("phantom-"))
    work = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    settings = Settings(home=work / "home")
    store = LocalStore(work / "store")
    if phantom:
        folder = write_phantom_folder(domain, work / "phantoms", 150, size=64, seed=a.seed)
    else:
        folder = real_data(domain.name)
        if folder is None:
            raise SystemExit(f"real images for {domain.name} not found under ../shared/data; nothing to measure")
    real, _ = ingest_folder(folder, domain, store, "datasets/real", resolution=a.resolution,
                            train_fraction=0.2, seed=a.seed)
    n_train = len(real.manifest.select("train"))

    t0 = time.monotonic()
    cfg = create_generator_config("cpu-small", domain, a.resolution)
    info = train_generator(real, cfg, store, "generators/bench", max_minutes=None if a.steps else a.minutes,
                           max_steps=a.steps, checkpoint_every=10**6, seed=a.seed, settings=settings, track=False)
    train_s = time.monotonic() - t0

    gen = load_generator("generators/bench", store, settings)
    labels = [i for i in range(domain.num_classes) for _ in range(a.per_class)]
    seeds = list(range(len(labels)))
    t0 = time.monotonic()
    images = gen.sample(labels, seeds, sampler=a.sampler, guidance=a.guidance, progress=True)
    sample_s = time.monotonic() - t0

    # the judge: pretrained EfficientNet-Lite0 trained on the real training split only
    judge = create_classifier("efficientnet_lite0", domain.num_classes, domain.channels,
                              classes=domain.classes, input_size=96, seed=a.seed)
    train_classifier(judge, real, domain=domain, epochs=a.epochs, seed=a.seed)
    real_test = evaluate(judge, real, "test", bootstrap=200, seed=a.seed)
    fidelity = class_fidelity(judge, images, labels, bootstrap=1000, seed=a.seed)
    out = write_result(f"class-fidelity-{a.domain}", {
        "domain": a.domain,
        **fidelity.model_dump(mode="json", exclude={"n"}),
        "judge_accuracy_on_real_test": real_test.accuracy,
        "real_train_images": n_train,
        "generator": {"preset": "cpu-small", "parameters": info.parameters, "steps": info.steps_trained,
                      "minutes": None if a.steps else a.minutes, "step_budget": a.steps,
                      "train_seconds": round(train_s, 1),
                      "images_per_second": info.images_per_second, "final_loss": info.final_loss},
        "sampling": {"sampler": a.sampler, "steps": 20, "guidance": a.guidance, "per_class": a.per_class,
                     "images_per_second": len(labels) / sample_s},
        "resolution": a.resolution, "seed": a.seed,
    })
    print(f"class fidelity {fidelity.class_fidelity:.3f} (judge on real test {real_test.accuracy:.3f}) -> {out}")


if __name__ == "__main__":
    main()
