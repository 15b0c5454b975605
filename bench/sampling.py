"""Our sampler against diffusers' stock 1000-step DDPM, on the *same* trained UNet: speed at equal quality.

Trains one small class-conditional generator on the real 20% training split (phantoms if the real images
are absent), then samples the same labels and per-image seeds, in the same batches, twice:
  - ours:  DPM-Solver++ (2M), 20 steps, classifier-free guidance w;
  - stock: `diffusers.DDPMScheduler` built from the same training scheduler config, 1000 steps (every
    training timestep, 999..0), ancestral stepping with fresh per-image noise as `DDPMPipeline` does,
    with the same guidance w (cond and uncond halves in one UNet call, as ours).
Speed is images/s of each arm (ours: median of repeated runs measured around the stock run). Quality is
TSTR: an EfficientNet-Lite0 (offline ImageNet weights) trained on each sample set, with the same seeds and
recipe, scored on the real test split (80%), averaged over classifier seeds, with a paired bootstrap of
the difference. A classifier trained on as many *real* training images is the reference.
Target: >= 25x faster with TSTR accuracy no more than 2 points below the stock sampler's.
Writes bench/results/sampling.json.

    python bench/sampling.py --scale small            # ~12-15 min on 2 CPU cores
    python bench/sampling.py --scale small --threads 1  # on a shared CPU (see STACK-NOTES)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import real_data, write_result  # noqa: E402
from meddiffuse.classify import create_classifier, train_classifier  # noqa: E402
from meddiffuse.classify.metrics import compute_metrics  # noqa: E402
from meddiffuse.config import Settings  # noqa: E402
from meddiffuse.data.dataset import Dataset, DatasetWriter, Origin  # noqa: E402
from meddiffuse.data.ingest import ingest_folder  # noqa: E402
from meddiffuse.data.phantoms import write_phantom_folder  # noqa: E402
from meddiffuse.domains import Domain, get_domain  # noqa: E402
from meddiffuse.generate import (  # noqa: E402
    class_seeds,
    create_generator_config,
    create_sampler,
    load_generator,
    train_generator,
)
from meddiffuse.store import LocalStore  # noqa: E402

# small: a 0.7 M-parameter UNet (tiny preset widened to three levels, attention at 8 px) so that 1000
# guided DDPM steps over one batch of 128 images take ~5-9 min on 2 cores; full: the cpu-small UNet.
# 32 images per class and 4 classifier seeds: with 16 and 2, the classifier seed alone moved TSTR by ~5 points
SMALL: dict[str, Any] = {
    "preset": "tiny", "resolution": 32,
    "overrides": {"block_out_channels": (16, 32, 64), "attention_levels": (False, False, True),
                  "attention_head_dim": 16, "norm_num_groups": 8, "batch_size": 64, "warmup_steps": 20},
    "generator_steps": 300, "per_class": 32, "batch_size": 128, "epochs": 15, "classifier_seeds": 4, "repeats": 3,
}
FULL: dict[str, Any] = {
    "preset": "cpu-small", "resolution": 32, "overrides": {},
    "generator_steps": 2000, "per_class": 64, "batch_size": 128, "epochs": 15, "classifier_seeds": 3, "repeats": 3,
}
TARGET_SPEEDUP = 25.0
TARGET_TSTR_POINTS = 2.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    p.add_argument("--scale", default="small", choices=["small", "full"])
    p.add_argument("--generator-steps", type=int, help="generator training step budget")
    p.add_argument("--per-class", type=int, help="images per class in each sample set")
    p.add_argument("--batch-size", type=int, help="images per sampling batch (both arms)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance w (both arms)")
    p.add_argument("--our-steps", type=int, default=20, help="steps of our sampler")
    p.add_argument("--sampler", default="dpmsolver++",
                   help="our sampler (a meddiffuse sampler name); other than the default, the result is "
                        "written to bench/results/sampling-<sampler>.json")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="stock DDPM steps (1000 = every training step)")
    p.add_argument("--repeats", type=int, help="timed runs of our sampler (median)")
    p.add_argument("--arch", default="efficientnet_lite0", help="TSTR classifier")
    p.add_argument("--input-size", type=int, default=96, help="TSTR classifier input side")
    p.add_argument("--epochs", type=int, help="TSTR classifier epochs")
    p.add_argument("--classifier-seeds", type=int, help="TSTR classifiers per sample set (accuracy averaged)")
    p.add_argument("--no-reference", action="store_true", help="skip the same-size real-data classifier")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    scale = SMALL if a.scale == "small" else FULL
    gen_steps = a.generator_steps or scale["generator_steps"]
    per_class = a.per_class or scale["per_class"]
    batch = a.batch_size or scale["batch_size"]
    epochs = a.epochs or scale["epochs"]
    n_clf = a.classifier_seeds or scale["classifier_seeds"]
    repeats = a.repeats or scale["repeats"]

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.monotonic()
    domain = get_domain(a.domain)
    work = Path(tempfile.mkdtemp(prefix="bench-sampling-"))
    settings = Settings(home=work / "home")
    store = LocalStore(work / "store")
    folder = real_data(domain.name)
    source = "real"
    if folder is None:
        source = "phantom"
        folder = write_phantom_folder(domain, work / "phantoms", 150, size=64, seed=a.seed)
    print(f"[sampling] ingesting {source} {domain.name} images from {folder}", flush=True)
    real, _ = ingest_folder(folder, domain, store, "datasets/real", resolution=scale["resolution"],
                            train_fraction=0.2, seed=a.seed)

    # -- one generator, trained once ---------------------------------------------------------------
    cfg = create_generator_config(scale["preset"], domain, scale["resolution"], **scale["overrides"])
    t0 = time.monotonic()
    info = train_generator(real, cfg, store, "generators/bench", max_steps=gen_steps, checkpoint_every=10**6,
                           seed=a.seed, settings=settings, track=False)
    train_s = time.monotonic() - t0
    gen = load_generator("generators/bench", store, settings)

    labels = [c for c in range(domain.num_classes) for _ in range(per_class)]
    seeds = [s for c in range(domain.num_classes) for s in class_seeds(a.seed, c, per_class)]
    common = dict(guidance=a.guidance, batch_size=batch)
    stock = check_stock_ddpm(gen.scheduler_config, a.ddpm_steps)

    # -- speed: same labels, seeds and batches; ours timed before and after the stock run -----------
    gen.sample(labels[:1], seeds[:1], steps=2, **common)  # warm-up (kernel selection, allocations)
    ours_s: list[float] = []
    ours_images = None

    def run_ours() -> None:
        nonlocal ours_images
        t = time.perf_counter()
        out = gen.sample(labels, seeds, sampler=a.sampler, steps=a.our_steps, **common)
        ours_s.append(time.perf_counter() - t)
        if ours_images is None:
            ours_images = out
        elif not np.array_equal(out, ours_images):
            raise RuntimeError("our sampler gave different images for the same seeds: timing runs disagree")

    before = (repeats + 1) // 2
    for _ in range(before):
        run_ours()
    estimate = statistics.median(ours_s) * a.ddpm_steps / a.our_steps
    print(f"[sampling] ours: {len(labels) / statistics.median(ours_s):.2f} images/s; stock DDPM "
          f"({a.ddpm_steps} steps) expected to take ~{estimate / 60:.1f} min", flush=True)
    t = time.perf_counter()
    ddpm_images = gen.sample(labels, seeds, sampler="ddpm", steps=a.ddpm_steps, progress=True, **common)
    ddpm_s = time.perf_counter() - t
    for _ in range(repeats - before):
        run_ours()
    ours_ips = len(labels) / statistics.median(ours_s)
    ddpm_ips = len(labels) / ddpm_s
    speedup = ours_ips / ddpm_ips
    print(f"[sampling] ours {ours_ips:.2f} images/s, stock DDPM {ddpm_ips:.3f} images/s: {speedup:.1f}x", flush=True)

    # -- quality: TSTR of each sample set on the real test split -------------------------------------
    origin = dict(generator="generators/bench", guidance=a.guidance)
    sets = {
        "ours": write_samples(store, "datasets/ours", domain, ours_images, labels, seeds,
                              Origin(kind="synthetic", sampler=a.sampler, steps=a.our_steps, **origin)),
        "ddpm": write_samples(store, "datasets/ddpm", domain, ddpm_images, labels, seeds,
                              Origin(kind="synthetic", sampler="ddpm", steps=a.ddpm_steps, **origin)),
    }
    if not a.no_reference:
        sets["real"] = real_subset(store, real, domain, per_class, a.seed)
    test_images, test_labels = real.load_arrays("test")
    tstr: dict[str, dict[str, Any]] = {}
    correct: dict[str, np.ndarray] = {}
    for name, ds in sets.items():
        tstr[name], correct[name] = score_set(ds, domain, test_images, test_labels, a, epochs, n_clf,
                                                settings.torch_device())
        print(f"[sampling] trained on {name}: real-test accuracy {tstr[name]['accuracy']:.3f}", flush=True)
    diff, diff_ci = paired_difference(correct["ours"], correct["ddpm"], a.bootstrap, a.seed)
    diff_points = 100 * diff
    # a second, seed-free measure: a linear probe on frozen ImageNet features of each sample set
    probe, probe_correct = probe_sets(sets, domain, test_images, test_labels, a)
    probe_diff, probe_ci = paired_difference(probe_correct["ours"], probe_correct["ddpm"], a.bootstrap, a.seed)
    print("[sampling] linear probe: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in probe.items()), flush=True)

    targets = [
        {"target": f"speed-up >= {TARGET_SPEEDUP:g}x", "measured": f"{speedup:.1f}x", "met": speedup >= TARGET_SPEEDUP},
        {"target": f"TSTR accuracy within {TARGET_TSTR_POINTS:g} points of stock DDPM (ours - DDPM >= "
                   f"-{TARGET_TSTR_POINTS:g})",
         "measured": f"{diff_points:+.1f} points (test-image 95% CI [{100 * diff_ci[0]:+.1f}, "
                     f"{100 * diff_ci[1]:+.1f}]; per classifier seed: ours {_spread(tstr['ours'])}, "
                     f"DDPM {_spread(tstr['ddpm'])})",
         "met": diff_points >= -TARGET_TSTR_POINTS},
        {"target": f"(secondary) linear-probe TSTR within {TARGET_TSTR_POINTS:g} points of stock DDPM",
         "measured": f"{100 * probe_diff:+.1f} points (95% CI [{100 * probe_ci[0]:+.1f}, {100 * probe_ci[1]:+.1f}])",
         "met": 100 * probe_diff >= -TARGET_TSTR_POINTS},
    ]
    path = write_result("sampling" if a.sampler == "dpmsolver++" else f"sampling-{a.sampler}", {
        "domain": a.domain, "data": source, "scale": a.scale, "seed": a.seed, "threads": torch.get_num_threads(),
        "resolution": scale["resolution"],
        "generator": {"preset": scale["preset"], "overrides": scale["overrides"], "parameters": info.parameters,
                      "steps": info.steps_trained, "step_budget": gen_steps, "train_seconds": round(train_s, 1),
                      "final_loss": info.final_loss, "training_images_per_second": info.images_per_second},
        "budget": {"per_class": per_class, "images": len(labels), "batch_size": batch, "timed_runs_ours": repeats,
                   "timed_runs_ddpm": 1, "classifier_epochs": epochs, "classifier_seeds": n_clf,
                   "classifier_input": a.input_size, "bootstrap": a.bootstrap},
        "seeds": {"generator_training": a.seed, "images": "class_seeds(seed, class, i): identical in both arms",
                  "classifiers": list(range(a.seed, a.seed + n_clf))},
        "ours": {"sampler": a.sampler, "steps": a.our_steps, "guidance": a.guidance,
                 "images_per_second": ours_ips, "run_seconds": ours_s, "tstr": tstr["ours"]},
        "ddpm": {"sampler": "diffusers.DDPMScheduler (stock ancestral DDPM)", "steps": a.ddpm_steps,
                 "guidance": a.guidance, "images_per_second": ddpm_ips, "run_seconds": [ddpm_s], **stock,
                 "tstr": tstr["ddpm"]},
        "real_reference": tstr.get("real"),
        "speedup": speedup,
        "tstr_difference_points": diff_points,
        "tstr_difference_ci95_points": [100 * diff_ci[0], 100 * diff_ci[1]],
        "linear_probe": {"method": "logistic regression on standardised pooled features of the ImageNet "
                                   f"{a.arch} (no fine-tuning): deterministic, no classifier-seed noise",
                         "accuracy": {k: v["accuracy"] for k, v in probe.items()},
                         "difference_points": 100 * probe_diff,
                         "difference_ci95_points": [100 * probe_ci[0], 100 * probe_ci[1]]},
        "targets": targets,
        "notes": "Speed: wall-clock images/s of DiffusionGenerator.sample over identical labels, seeds and batch "
                 "width; ours is the median of runs before and after the stock run. On a shared CPU the absolute "
                 "figures are noisy; the ratio is measured side by side. TSTR: the 95% CIs resample test images "
                 "only; with this few training images the classifier seed moves accuracy by several points "
                 "(see per_seed), so a difference of a few points is within training noise.",
        "minutes_total": round((time.monotonic() - t_start) / 60, 1),
    })
    print(f"[sampling] speed-up {speedup:.1f}x; TSTR ours {tstr['ours']['accuracy']:.3f} vs DDPM "
          f"{tstr['ddpm']['accuracy']:.3f} ({diff_points:+.1f} points) -> {path}")


def check_stock_ddpm(scheduler_config: Any, steps: int) -> dict[str, Any]:
    """Confirm that the generator's "ddpm" sampler is diffusers' stock DDPMScheduler stepping.

    The registry builds `DDPMScheduler.from_config(train_config, timestep_spacing="trailing")`; at
    steps == num_train_timesteps this visits the same timesteps (999..0) as the stock default ("leading"),
    so the two are the same sampler. Refuses to run if that is not so.
    """
    from diffusers import DDPMScheduler

    ours = create_sampler("ddpm", scheduler_config)
    stock = DDPMScheduler.from_config(scheduler_config)
    ours.set_timesteps(steps)
    stock.set_timesteps(steps)
    if type(ours) is not DDPMScheduler or not np.array_equal(ours.timesteps.numpy(), stock.timesteps.numpy()):
        raise SystemExit("the generator's 'ddpm' sampler is not the stock DDPMScheduler at these steps")
    return {"timesteps_equal_stock": True, "variance_type": stock.config.variance_type,
            "prediction_type": stock.config.prediction_type, "beta_schedule": stock.config.beta_schedule,
            "first_timesteps": stock.timesteps[:3].tolist(), "last_timestep": int(stock.timesteps[-1])}


def write_samples(store: LocalStore, prefix: str, domain: Domain, images: np.ndarray, labels: list[int],
                  seeds: list[int], origin: Origin) -> Dataset:
    writer = DatasetWriter(store, prefix, domain, images.shape[1])
    for img, y, s in zip(images, labels, seeds, strict=True):
        writer.add(img, domain.classes[y], "train",
                   origin=origin.model_copy(update={"seed": int(s)}), key=f"images/{domain.classes[y]}/{s}.png")
    return writer.commit()


def real_subset(store: LocalStore, real: Dataset, domain: Domain, per_class: int, seed: int) -> Dataset:
    """``per_class`` real training images per class (seeded choice): the same-size real reference."""
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(store, "datasets/real-subset", domain, real.manifest.resolution)
    for label in domain.classes:
        entries = sorted((e for e in real.manifest.select("train") if e.label == label), key=lambda e: e.key)
        for i in rng.permutation(len(entries))[:per_class]:
            writer.add(real.load_image(entries[i]), label, "train", key=entries[i].key)
    return writer.commit()


def score_set(ds: Dataset, domain: Domain, test_images: np.ndarray, test_labels: np.ndarray,
              a: argparse.Namespace, epochs: int, n_clf: int, device: str) -> tuple[dict[str, Any], np.ndarray]:
    """Train ``n_clf`` classifiers (seeds seed..seed+n-1) on ``ds``; metrics of the seed-averaged correctness."""
    per_seed, hits = [], []
    for s in range(a.seed, a.seed + n_clf):
        clf = create_classifier(a.arch, domain.num_classes, domain.channels, classes=domain.classes,
                                input_size=a.input_size, seed=s).to(device)
        # tiny training sets: no validation carve-out, the last epoch's weights are kept
        train_classifier(clf, ds, domain=domain, epochs=epochs, batch_size=16, val_fraction=0.0, seed=s,
                         progress=False)
        probs = clf.optimize_for_inference().predict_proba(test_images)
        m = compute_metrics(test_labels, probs, domain.classes, bootstrap=0)
        per_seed.append({"seed": s, "accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy,
                         "macro_f1": m.macro_f1})
        hits.append(probs.argmax(1) == test_labels)
    correct = np.mean(hits, axis=0)  # per test image: share of the seeds' classifiers that got it right
    ci = bootstrap_mean(correct, a.bootstrap, a.seed)
    return {
        "arch": a.arch, "n_train": len(ds.manifest.entries), "n_test": len(test_labels),
        "accuracy": float(correct.mean()), "accuracy_ci95": list(ci),
        "balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in per_seed])),
        "macro_f1": float(np.mean([r["macro_f1"] for r in per_seed])),
        "per_seed": per_seed,
    }, correct


def probe_sets(sets: dict[str, Dataset], domain: Domain, test_images: np.ndarray, test_labels: np.ndarray,
               a: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Per sample set: a logistic-regression probe on frozen ImageNet features, scored on the real test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    body = create_classifier(a.arch, domain.num_classes, domain.channels, classes=domain.classes,
                             input_size=a.input_size, seed=a.seed)
    test_features = body.features(test_images, batch_size=128)
    out, correct = {}, {}
    for name, ds in sets.items():
        images, labels = ds.load_arrays()
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        probe.fit(body.features(images, batch_size=128), labels)
        correct[name] = (probe.predict(test_features) == test_labels).astype(float)
        out[name] = {"accuracy": float(correct[name].mean()), "n_train": len(labels)}
    return out, correct


def _spread(t: dict[str, Any]) -> str:
    accs = [r["accuracy"] for r in t["per_seed"]]
    return f"{min(accs):.3f}-{max(accs):.3f}"


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, tuple[float, float]]:
    """Accuracy difference a - b on the same test images, with a paired percentile-bootstrap 95% interval."""
    return float(a.mean() - b.mean()), bootstrap_mean(a - b, resamples, seed)


if __name__ == "__main__":
    main()
