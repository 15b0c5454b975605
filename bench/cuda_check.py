"""The CUDA path, end to end on phantoms, with GPU timings: run it where a GPU is present.

Checks (each recorded as ok / error, never stopping the rest):
  generator   cpu-small at 32 px trained on CUDA with mixed precision (bf16 where supported), a
              checkpoint, an interrupted-then-resumed run, guided DPM-Solver++ sampling, and that an
              image regenerated alone equals the same seed drawn inside a batch
  gpu-base    training images/s of the 128 px preset (the study-scale generator)
  classifier  EfficientNet-Lite0 trained and evaluated on CUDA; save -> load gives the same predictions
  lime        explain_with_classifier on CUDA: seconds per image at 1000 samples

    python bench/cuda_check.py [--out bench/results/cuda-check.json]

Writes bench/results/cuda-check.json (or --out). Exits 2 without a GPU: there is nothing to check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from meddiffuse.config import Settings  # noqa: E402
from meddiffuse.data.phantoms import phantom_dataset  # noqa: E402
from meddiffuse.domains import get_domain  # noqa: E402
from meddiffuse.store import LocalStore  # noqa: E402

BRAIN = get_domain("brain-mri")


def check(results: dict[str, Any], name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as exc:  # noqa: BLE001 - a failed check is a finding, the others still run
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[cuda-check] {name}: {'ok' if results[name]['ok'] else results[name]['error']} "
          f"({results[name]['seconds']} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="also copy the JSON here (e.g. $OUT on a device machine)")
    p.add_argument("--steps", type=int, default=300, help="cpu-small generator steps")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script itself (with --steps 4)")
    a = p.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    from meddiffuse.generate import create_generator_config, load_generator, train_generator

    work = Path(tempfile.mkdtemp(prefix="cuda-check-"))
    settings = Settings(home=work, store=str(work / "store"), tracking_uri="", device=dev)
    store = LocalStore(work / "store")
    real = phantom_dataset(store, "datasets/phantoms-32", BRAIN, n_per_class=64, resolution=32)
    on_gpu = dev == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    results: dict[str, Any] = {"torch": torch.__version__,
                               "device_name": torch.cuda.get_device_name(0) if on_gpu else "cpu (dry run)",
                               "bf16_supported": torch.cuda.is_bf16_supported() if on_gpu else None}
    common = dict(checkpoint_every=a.steps // 2, seed=0, settings=settings, progress=False, track=False)

    def generator() -> dict[str, Any]:
        cfg = create_generator_config("cpu-small", BRAIN, 32)
        full = train_generator(real, cfg, store, "gen/full", max_steps=a.steps, **common)
        half = train_generator(real, cfg, store, "gen/resumed", max_steps=a.steps // 2, **common)
        resumed = train_generator(real, cfg, store, "gen/resumed", max_steps=a.steps, resume=True, **common)
        gen = load_generator("gen/full", store, settings, device=dev)
        other = load_generator("gen/resumed", store, settings, device=dev)
        w_full = torch.cat([p.flatten() for p in gen.unet.parameters()])
        w_res = torch.cat([p.flatten() for p in other.unet.parameters()])
        labels = [c for c in range(BRAIN.num_classes) for _ in range(64)]
        seeds = list(range(len(labels)))
        gen.sample(labels[:2], seeds[:2], steps=2)  # warm-up
        sync()
        t0 = time.perf_counter()
        images = gen.sample(labels, seeds, steps=20, guidance=2.0, batch_size=128)
        sync()
        sample_s = time.perf_counter() - t0
        alone = gen.sample(labels[5:6], seeds[5:6], steps=20, guidance=2.0, batch_size=128)
        from meddiffuse.generate import DEFAULT_SAMPLER

        return {"sampler": DEFAULT_SAMPLER, "train_images_per_second": full.images_per_second,
                "final_loss": full.final_loss,
                "resumed_from_step": resumed.resumed_from_step, "half_steps": half.steps_trained,
                "resumed_final_loss": resumed.final_loss,
                "resumed_vs_uninterrupted_max_weight_diff": float((w_full - w_res).abs().max()),
                "sample_images_per_second": len(labels) / sample_s,
                "images_finite_uint8": bool(images.dtype == np.uint8 and images.shape == (256, 32, 32, 1)),
                "image_std": float(images.std()),
                "alone_equals_in_batch": bool(np.array_equal(alone[0], images[5])),
                "alone_max_abs_diff": int(np.abs(alone[0].astype(int) - images[5].astype(int)).max())}

    def gpu_base() -> dict[str, Any]:
        big = phantom_dataset(store, "datasets/phantoms-128", BRAIN, n_per_class=16, resolution=128)
        cfg = create_generator_config("gpu-base", BRAIN, 128)
        info = train_generator(big, cfg, store, "gen/base", max_steps=40, checkpoint_every=10**6, seed=0,
                               settings=settings, progress=False, track=False)
        return {"parameters": info.parameters, "batch_size": cfg.batch_size,
                "train_images_per_second": info.images_per_second, "mixed_precision": cfg.mixed_precision}

    def classifier() -> dict[str, Any]:
        from meddiffuse.classify import create_classifier, evaluate, load_classifier, save_classifier, train_classifier

        clf = create_classifier("efficientnet_lite0", 4, 1, input_size=96, classes=BRAIN.classes, seed=0).to(dev)
        t0 = time.perf_counter()
        train_classifier(clf, real, domain=BRAIN, epochs=3, batch_size=32, seed=0, progress=False)
        train_s = time.perf_counter() - t0
        r = evaluate(clf, real, "test", bootstrap=0)
        save_classifier(clf, store, "clf/lite0")
        again = load_classifier("clf/lite0", store, settings).to(dev)
        images, _ = real.load_arrays("test")
        same = float(np.abs(clf.predict_proba(images) - again.predict_proba(images)).max())
        return {"accuracy": r.accuracy, "train_seconds": round(train_s, 1), "device": str(clf.device),
                "frozen_on_cuda": clf._frozen is not None, "reload_max_prob_diff": same}

    def lime() -> dict[str, Any]:
        from meddiffuse.classify import create_classifier
        from meddiffuse.explain import classifier_predict_fn, explain_image, explain_with_classifier

        clf = create_classifier("efficientnet_lite0", 4, 1, input_size=96, classes=BRAIN.classes, seed=0).to(dev)
        images, _ = real.load_arrays("test")
        n_samples = 1000 if on_gpu else 60
        sync()
        t0 = time.perf_counter()
        first = explain_with_classifier(clf, images[:2], num_samples=n_samples, progress=False)
        sync()
        cold = time.perf_counter() - t0
        seconds = []
        for i in range(2, 8):
            sync()
            t0 = time.perf_counter()
            explain_with_classifier(clf, images[i:i + 1], num_samples=n_samples, progress=False,
                                    batch_size=first[0].batch_size)
            sync()
            seconds.append(time.perf_counter() - t0)
        # the padded GPU predict path must explain exactly as the plain one does
        plain = explain_image(lambda x: clf.predict_proba(x, batch_size=len(x)), images[2], num_samples=n_samples,
                              batch_size=first[0].batch_size)
        padded = explain_image(classifier_predict_fn(clf), images[2], num_samples=n_samples,
                               batch_size=first[0].batch_size)
        return {"seconds_per_image_median": statistics.median(seconds), "per_image_seconds": seconds,
                "first_two_images_seconds": cold, "batch_size": first[0].batch_size,
                "n_segments": first[0].n_segments,
                "padded_vs_plain_max_weight_diff": float(np.abs(plain.weights - padded.weights).max())}

    check(results, "generator", generator)
    if on_gpu:
        check(results, "gpu_base", gpu_base)
    check(results, "classifier", classifier)
    check(results, "lime", lime)
    if on_gpu:
        path = write_result("cuda-check", {"checks": results})
    else:  # a dry run of the script: nothing goes to bench/results
        path = work / "cuda-check-dry-run.json"
        path.write_text(json.dumps({"checks": results}, indent=2, default=float))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "cuda-check.json").write_text(path.read_text())
    print(path.read_text()[:4000])
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
