"""Audit of synthetic data: metric agreement with reference implementations, and the audit end to end.

Three "synthetic" datasets make the behaviour visible on 32 px brain phantoms (12 train / 12 test per
class): copies of the training images (must be flagged), uniform noise (must look unlike anything
real) and fresh phantoms never trained on (real held-out images: must pass as faithful, not copies).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import prdc as prdc_reference
import pytest
import scipy.linalg
from PIL import Image
from skimage.metrics import structural_similarity

from meddiffuse.data.dataset import Dataset, DatasetWriter, Origin, open_dataset
from meddiffuse.data.phantoms import phantom_dataset
from meddiffuse.domains import get_domain
from meddiffuse.quality import (
    AuditResult,
    FeatureExtractor,
    IncompatibleDatasets,
    StaleAudit,
    audit_html,
    audit_prefix,
    c2st,
    downsampled_pixels,
    frechet_distance,
    kernel_inception_distance,
    load_audit,
    memorization,
    ms_ssim,
    ms_ssim_diversity,
    prdc,
    run_audit,
    save_audit,
)
from meddiffuse.quality.diversity import auto_scales, sample_pairs
from meddiffuse.quality.features import extract_features
from meddiffuse.quality.tracking import audit_metrics, parse_model_uri
from meddiffuse.store import LocalStore, ObjectNotFound

BRAIN = get_domain("brain-mri")
GENERATOR = "meddiffuse-generator-brain-mri"


# --- helpers ------------------------------------------------------------------------------------


def random_conv_features(seed: int = 0) -> FeatureExtractor:
    """A fixed random-weight conv net: deterministic, spatially aware features without training."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def extract(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return net(x.expand(-1, 3, -1, -1)).numpy()

    return extract


def extractors() -> dict[str, FeatureExtractor]:
    return {"randconv": random_conv_features(), "thumbnails": downsampled_pixels(8)}


def write_synthetic(store, prefix: str, images: np.ndarray, labels: np.ndarray,
                    generators: list[str | None] | None = None) -> Dataset:
    """A 'synthetic' Dataset with the given images; entry i names generators[i % len] as its origin."""
    writer = DatasetWriter(store, prefix, BRAIN, images.shape[1])
    writer.withdraw()
    generators = generators or [None]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        origin = Origin(kind="synthetic", generator=generators[i % len(generators)], seed=i)
        writer.add(image, BRAIN.classes[label], "train", origin=origin, key=f"images/{i:05d}.png")
    return writer.commit()


def noise_images(n_per_class: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(BRAIN.num_classes), n_per_class)
    return rng.integers(0, 256, (len(labels), side, side, 1), dtype=np.uint8), labels


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Real phantoms and the three 'synthetic' sets, audited once for the whole module."""
    store = LocalStore(tmp_path_factory.mktemp("quality") / "store")
    real = phantom_dataset(store, "datasets/real", "brain-mri", n_per_class=24, resolution=32)
    train_x, train_y = real.load_arrays("train")
    copy = write_synthetic(store, "datasets/copy", train_x, train_y)
    noise = write_synthetic(store, "datasets/noise", *noise_images(12, 32, seed=5))
    fresh = phantom_dataset(store, "datasets/fresh", "brain-mri", n_per_class=12, resolution=32, seed=1)
    audits = {
        name: run_audit(ds, real, extractors=extractors(), seed=0, progress=False, kid_subsets=10)
        for name, ds in (("copy", copy), ("noise", noise), ("fresh", fresh))
    }
    return {"store": store, "real": real, "copy": copy, "noise": noise, "fresh": fresh, "audits": audits}


# --- fidelity metrics against reference implementations ------------------------------------------


@pytest.mark.parametrize(("seed", "n_real", "n_fake", "dim", "k", "chunk"), [
    (0, 200, 150, 16, 5, 1024), (1, 60, 90, 8, 3, 7), (2, 40, 40, 64, 5, 16), (3, 120, 30, 2, 1, 1024),
])
def test_prdc_matches_reference_package(seed, n_real, n_fake, dim, k, chunk):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, dim))
    fake = rng.normal(0.4, 1.3, size=(n_fake, dim))
    ours = prdc(real, fake, k=k, chunk=chunk)
    expected = prdc_reference.compute_prdc(real, fake, nearest_k=k)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(expected[name]), abs=1e-12), name


def test_prdc_separates_overlap_from_disjoint_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 8))
    same = prdc(real, rng.normal(size=(150, 8)))
    far = prdc(real, rng.normal(50.0, 1.0, size=(150, 8)))
    assert same["precision"] > 0.8 and same["coverage"] > 0.8
    assert far["precision"] == far["density"] == far["coverage"] == far["recall"] == 0.0


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize(("n1", "n2", "dim"), [(300, 200, 12), (80, 80, 40), (20, 30, 64), (12, 12, 128)])
def test_frechet_distance_matches_scipy_sqrtm(n1, n2, dim):
    """Both code paths: more samples than dimensions, and the singular per-class case."""
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n1, dim))
    b = rng.normal(0.2, 1.0, size=(n2, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim)
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(100, 6))
    shift = rng.normal(size=6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def _reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, k(a, b) = (a.b / d + 1)^3, written out term by term."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_reference_formula():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(30, 5))
    # a subset as large as both sets is the whole set, every time: exact value, zero spread
    score = kernel_inception_distance(x, y, subsets=3, subset_size=1000, seed=0)
    assert score["mean"] == pytest.approx(_reference_kid(x, y), rel=1e-10)
    assert score["std"] == pytest.approx(0.0, abs=1e-12)
    assert score["subset_size"] == 30


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 10))
    same = kernel_inception_distance(x, rng.normal(size=(300, 10)), subsets=20, subset_size=100, seed=1)
    shifted = kernel_inception_distance(x, rng.normal(1.0, 1.0, size=(300, 10)), 20, 100, 1)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3
    assert shifted["mean"] > 10 * (abs(same["mean"]) + same["std"])


def test_kid_is_reproducible_by_seed():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(150, 6))
    assert kernel_inception_distance(x, y, 5, 40, seed=3) == kernel_inception_distance(x, y, 5, 40, seed=3)
    assert kernel_inception_distance(x, y, 5, 40, seed=3) != kernel_inception_distance(x, y, 5, 40, seed=4)


def test_c2st_detects_separable_sets_and_not_identical_distributions():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(120, 10))
    separable = c2st(real, rng.normal(3.0, 1.0, size=(80, 10)), seed=0)
    assert separable["accuracy"] > 0.95 and separable["p_value"] < 1e-6
    assert separable["n"] == 80  # balanced to 80 + 80, half held out
    same = c2st(real, rng.normal(size=(120, 10)), seed=0)
    assert same["p_value"] > 0.01 and same["accuracy"] < 0.7


@pytest.mark.parametrize(("call", "message"), [
    (lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))), "different feature dimensions"),
    (lambda: frechet_distance(np.zeros(5), np.zeros((5, 1))), "2-D"),
    (lambda: prdc(np.zeros((5, 2)), np.ones((10, 2)), k=5), "more than 5 real"),
    (lambda: kernel_inception_distance(np.zeros((1, 2)), np.zeros((4, 2))), "at least 2 rows"),
    (lambda: c2st(np.full((4, 2), np.nan), np.zeros((4, 2))), "NaN"),
    (lambda: c2st(np.zeros((4, 2)), np.zeros((4, 2)), test_fraction=1.0), "test_fraction"),
])
def test_metrics_reject_bad_input_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- diversity -----------------------------------------------------------------------------------


def _smooth_pair(shape, seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    sigma = (2, 2, 0) if len(shape) == 3 else 2
    a = gaussian_filter(rng.uniform(0, 255, shape), sigma)
    return a, np.clip(a + rng.normal(0, 12, shape), 0, 255)


@pytest.mark.parametrize("shape", [(48, 40, 3), (33, 33)])
def test_single_scale_ssim_equals_scikit_image(shape):
    a, b = _smooth_pair(shape, 0)
    expected = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255, channel_axis=2 if len(shape) == 3 else None)
    assert ms_ssim(a, b, scales=1, win_size=11)[0] == pytest.approx(expected, abs=1e-5)


def test_ms_ssim_scales_for_small_images_and_orders_similarity():
    assert [auto_scales(s) for s in (8, 16, 32, 64, 128, 256)] == [1, 2, 3, 4, 5, 5]
    a, b = _smooth_pair((32, 32, 1), 1)
    rng = np.random.default_rng(1)
    noisier = np.clip(a + rng.normal(0, 60, a.shape), 0, 255)
    assert ms_ssim(a, a)[0] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > ms_ssim(a, b)[0] > ms_ssim(a, noisier)[0] >= 0.0
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim(np.zeros((5, 5)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(a, b, scales=4)


def test_pair_sampling_covers_small_sets_and_never_pairs_an_image_with_itself():
    i, j = sample_pairs(6, 100, seed=0)
    assert len(i) == math.comb(6, 2) and len(set(zip(i, j, strict=True))) == 15
    i, j = sample_pairs(500, 300, seed=0)
    assert len(i) == 300 and not np.any(i == j)


def test_diversity_ranks_identical_then_phantoms_then_noise(scenario):
    real_x, _ = scenario["real"].load_arrays("train")
    noise_x, _ = noise_images(12, 32, seed=9)
    identical = np.repeat(real_x[:1], 10, axis=0)
    assert ms_ssim_diversity(identical, max_pairs=20) == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim_diversity(real_x, 200) > ms_ssim_diversity(noise_x, 200)


# --- memorization on arrays ---------------------------------------------------------------------


def test_memorization_flags_copies_and_mirrored_copies_only_when_asked(scenario):
    real = scenario["real"]
    train, _ = real.load_arrays("train")
    test, _ = real.load_arrays("test")
    fresh, _ = scenario["fresh"].load_arrays()
    copies = train[[3, 10, 20]]
    mirrored = np.ascontiguousarray(train[[5, 30]][:, :, ::-1])
    synthetic = np.concatenate([copies, mirrored, fresh[:5]])

    plain = memorization(synthetic, train, test, feature_fn=random_conv_features())
    assert set(plain.spaces) == {"pixel", "features"}
    assert plain.flagged[:3] == [True, True, True]
    assert plain.spaces["pixel"].nearest_train_index[:3] == [3, 10, 20]
    assert plain.spaces["pixel"].nearest_distance[:3] == [0.0, 0.0, 0.0]

    with_mirror = memorization(synthetic, train, test, mirror=True)
    pixel = with_mirror.spaces["pixel"]
    assert with_mirror.flagged[3:5] == [True, True]
    assert pixel.nearest_train_index[3:5] == [5, 30] and pixel.nearest_mirrored[3:5] == [True, True]
    # no real test image falls below its own calibration threshold
    assert with_mirror.n_test == len(test) and pixel.threshold > 0
    pairs = with_mirror.closest_pairs(top=3)
    assert [p.ratio for p in pairs] == sorted(p.ratio for p in pairs) and pairs[0].flagged


def test_memorization_rejects_mismatched_images():
    a = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="resize"):
        memorization(a, np.zeros((4, 16, 16, 1), np.uint8), a)
    with pytest.raises(ValueError, match="real_test is empty"):
        memorization(a, a, a[:0])
    with pytest.raises(ValueError, match="percentile"):
        memorization(a, a, a, percentile=0.0)


# --- the audit end to end --------------------------------------------------------------------------


def test_copies_of_training_images_are_flagged_and_indistinguishable(scenario):
    result = scenario["audits"]["copy"]
    assert result.memorization.flagged_keys and result.gate.flagged_share >= 0.9
    assert not result.passed and result.verdict().startswith("FAILED")
    for space, scores in result.overall.fidelity.items():
        assert scores.c2st_accuracy <= 0.6 and scores.c2st_p_value > 0.05, space
        assert scores.frechet_distance == pytest.approx(0.0, abs=1e-6), space
        assert scores.precision == scores.coverage == 1.0, space
    # every reported pair points at the very training image that was copied
    store, real, copy = scenario["store"], scenario["real"], scenario["copy"]
    for pair in result.memorization.closest_pairs:
        syn = copy.load_image(next(e for e in copy.manifest.entries if e.key == pair.synthetic_key))
        train = real.load_image(next(e for e in real.manifest.entries if e.key == pair.train_key))
        assert pair.flagged and np.array_equal(syn, train[:, ::-1] if pair.mirrored else train)
    assert store.exists(real.key(result.memorization.closest_pairs[0].train_key))


def test_noise_has_no_precision_and_is_trivially_detected(scenario):
    result = scenario["audits"]["noise"]
    fresh = scenario["audits"]["fresh"]
    for space, scores in result.overall.fidelity.items():
        assert scores.precision <= 0.05 and scores.density <= 0.05, space
        assert scores.c2st_accuracy >= 0.95 and scores.c2st_p_value < 1e-6, space
        assert scores.frechet_distance > 5 * fresh.overall.fidelity[space].frechet_distance, space
        assert scores.kid > fresh.overall.fidelity[space].kid, space
    assert result.gate.flagged_share == 0.0 and result.passed
    noise_div = result.overall.diversity.synthetic_ms_ssim
    assert noise_div < result.overall.diversity.real_ms_ssim


def test_held_out_real_images_are_faithful_and_not_flagged(scenario):
    result = scenario["audits"]["fresh"]
    assert result.gate.flagged_share <= 0.1
    for space, scores in result.overall.fidelity.items():
        assert scores.coverage >= 0.7 and scores.precision >= 0.7, space
        assert scores.c2st_accuracy < 0.75, space


def test_audit_has_every_class_and_an_overall_section(scenario):
    result = scenario["audits"]["fresh"]
    assert list(result.per_class) == BRAIN.classes
    assert result.overall.n_synthetic == sum(s.n_synthetic for s in result.per_class.values()) == 48
    for label, section in result.per_class.items():
        assert section.n_synthetic == section.n_real_train == section.n_real_test == 12, label
        assert set(section.fidelity) == {"randconv", "thumbnails"}
        assert section.diversity.synthetic_ms_ssim is not None
        flagged_in_class = sum(
            1 for k in result.memorization.flagged_keys if k.startswith(f"images/{label}/")
        )
        assert section.memorization.n_flagged == flagged_in_class
    assert result.memorization_spaces == ["pixel", "randconv"]
    assert result.memorization.mirror is True  # brain-mri trains with horizontal flips


def test_gate_marks_a_copying_dataset_failed_and_is_configurable(scenario):
    copy, real = scenario["copy"], scenario["real"]
    lenient = run_audit(copy, real, extractors={"thumbnails": downsampled_pixels(8)}, gate_flagged_share=1.0,
                        progress=False, kid_subsets=2)
    strict = scenario["audits"]["copy"]
    assert lenient.passed and not strict.passed
    assert json.loads(strict.model_dump_json())["passed"] is False
    assert "expected from unseen real images + 1.0% allowed excess" in strict.verdict()
    assert strict.gate.expected_share == pytest.approx(0.02)  # 1st percentile x two spaces


def test_audit_refuses_incompatible_datasets(scenario, tmp_path):
    store = LocalStore(tmp_path / "store")
    covid = phantom_dataset(store, "datasets/covid", "covid-ct", n_per_class=4, resolution=32)
    big = phantom_dataset(store, "datasets/big", "brain-mri", n_per_class=4, resolution=48)
    with pytest.raises(IncompatibleDatasets, match="'covid-ct' but real dataset is 'brain-mri'"):
        run_audit(covid, scenario["real"], extractors={}, progress=False)
    with pytest.raises(IncompatibleDatasets, match="48 px"):
        run_audit(big, scenario["real"], extractors={}, progress=False)
    with pytest.raises(ValueError, match="gate_flagged_share"):
        run_audit(scenario["fresh"], scenario["real"], extractors={}, gate_flagged_share=2, progress=False)


def test_small_classes_get_notes_instead_of_crashing(scenario, tmp_path):
    store = LocalStore(tmp_path / "store")
    train_x, train_y = scenario["real"].load_arrays("train")
    few = write_synthetic(store, "datasets/few", train_x[[0, 1, 12]], train_y[[0, 1, 12]])
    result = run_audit(few, scenario["real"], extractors={"thumbnails": downsampled_pixels(8)},
                       progress=False, kid_subsets=2)
    glioma = result.per_class["glioma"].fidelity["thumbnails"]
    assert glioma.precision is None and any("PRDC" in n for n in glioma.notes)
    assert glioma.frechet_distance is not None  # two images are enough for a covariance
    assert result.per_class["notumor"].n_synthetic == 0


def test_feature_extractor_output_is_checked():
    images = np.zeros((3, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="expected"):
        extract_features(lambda x: np.zeros(len(x)), images, desc="bad")
    with pytest.raises(ValueError, match="uint8"):
        extract_features(downsampled_pixels(4), images.astype(np.float32))


# --- persistence, report, tracking, CLI -------------------------------------------------------------


def test_save_audit_writes_json_then_pairs_png_beside_the_dataset(scenario, tmp_path):
    store = LocalStore(tmp_path / "store")
    fresh_x, fresh_y = scenario["fresh"].load_arrays()
    synthetic = write_synthetic(store, "datasets/synth", fresh_x, fresh_y)
    result = run_audit(synthetic, scenario["real"], extractors={"thumbnails": downsampled_pixels(8)},
                       progress=False, kid_subsets=2, top_pairs=5)
    key = save_audit(result, store)
    assert key == "datasets/synth/audit/audit.json"
    saved = json.loads(store.get_text(key))
    assert saved["synthetic"]["id"] == synthetic.id and saved["passed"] == result.passed
    with Image.open(io.BytesIO(store.get(saved["artifacts"]["closest_pairs_png"]))) as png:
        assert png.height > 5 * 96  # five rows of pairs
    assert open_dataset(store, "datasets/synth").id == synthetic.id  # the dataset is untouched

    loaded = load_audit(store, audit_prefix(synthetic.prefix), synthetic=synthetic)
    assert loaded.model_dump() == AuditResult.model_validate(saved).model_dump()
    assert loaded.pairs_png == result.pairs_png
    resampled = write_synthetic(store, "datasets/synth", fresh_x[:20], fresh_y[:20])
    with pytest.raises(StaleAudit, match="audit it again"):  # it judged the previous samples
        load_audit(store, "datasets/synth/audit", synthetic=resampled)
    with pytest.raises(ObjectNotFound, match="no audit at"):
        load_audit(store, "datasets/other/audit")


def test_audit_html_states_the_verdict_and_escapes_names(scenario):
    result = scenario["audits"]["copy"].model_copy(deep=True)  # keeps the rendered pairs image
    result.synthetic.name = "<script>x</script>"
    html = audit_html(result)
    assert "FAILED" in html and "audit-failed" in html
    assert "<script>x" not in html and "&lt;script&gt;" in html
    assert all(cls in html for cls in BRAIN.classes)
    assert 'src="data:image/png;base64,' in html
    assert 'src="pairs.png"' in audit_html(result, image_src="pairs.png")


def test_metric_names_and_model_uris():
    assert parse_model_uri("models:/gen/3") == ("gen", "3", None)
    assert parse_model_uri("models:/gen@champion") == ("gen", None, "champion")
    assert parse_model_uri("runs:/abc/model") is None and parse_model_uri("models:/gen") is None


def test_cli_audit_writes_store_logs_mlflow_and_tags_the_generator(settings, store, scenario):
    import mlflow
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from meddiffuse.cli import app
    from meddiffuse.store.tracking import configure_mlflow

    configure_mlflow(settings)
    client = MlflowClient()
    client.create_registered_model(GENERATOR)
    version = client.create_model_version(GENERATOR, source=str(settings.home / "generator")).version
    client.set_registered_model_alias(GENERATOR, "champion", version)

    real = phantom_dataset(store, "datasets/real", "brain-mri", n_per_class=24, resolution=32)
    train_x, train_y = real.load_arrays("train")
    generators = [f"models:/{GENERATOR}@champion", "models:/no-such-generator/1"]
    write_synthetic(store, "datasets/copy", train_x, train_y, generators=generators)

    runner = CliRunner()
    args = ["audit", "--synthetic", "datasets/copy", "--real", "datasets/real", "-f", "thumbnails", "--no-progress"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "FAILED" in out.output

    saved = json.loads(store.get_text("datasets/copy/audit/audit.json"))
    assert saved["passed"] is False and store.exists(saved["artifacts"]["closest_pairs_png"])
    outcomes = saved["tracking"]["generator_tags"]
    assert outcomes[generators[0]].startswith("tagged") and outcomes[generators[1]].startswith("skipped")
    tags = client.get_model_version(GENERATOR, version).tags
    assert tags["audit.passed"] == "false" and tags["audit.run_id"] == saved["tracking"]["run_id"]

    run = mlflow.get_run(saved["tracking"]["run_id"])
    assert run.data.metrics["flagged_share"] == saved["gate"]["flagged_share"]
    result = AuditResult.model_validate(saved)
    assert set(audit_metrics(result)) <= set(run.data.metrics)
    assert "overall/thumbnails/frechet_distance" in run.data.metrics

    strict = runner.invoke(app, [*args, "--strict", "--no-track"])
    assert strict.exit_code == 1
    missing = runner.invoke(app, ["audit", "--synthetic", "datasets/nope", "--real", "datasets/real",
                                  "-f", "thumbnails", "--no-track"])
    assert missing.exit_code == 2 and "no dataset at 'datasets/nope'" in missing.output


def test_imagenet_features_are_wired_from_the_classifier_package(scenario):
    from meddiffuse.quality.features import build_extractors

    extract = build_extractors(["imagenet"], scenario["real"])["imagenet"]
    images, _ = scenario["real"].load_arrays("test")
    feats = extract_features(extract, np.concatenate([images[:3], images[:1]]))
    assert feats.shape == (4, 1280) and np.isfinite(feats).all()
    assert np.allclose(feats[0], feats[3], atol=1e-5) and not np.allclose(feats[0], feats[1])
    with pytest.raises(ValueError, match="unknown feature space"):
        build_extractors(["inception"], scenario["real"])


@pytest.mark.slow
def test_domain_features_come_from_a_classifier_trained_on_real_train(scenario):
    from meddiffuse.quality.features import build_extractors

    spaces = build_extractors(["imagenet", "domain"], scenario["real"], epochs=1, progress=False)
    images, _ = scenario["real"].load_arrays("test")
    imagenet = extract_features(spaces["imagenet"], images[:6])
    domain = extract_features(spaces["domain"], images[:6])
    assert domain.shape == imagenet.shape == (6, 1280)
    assert not np.allclose(domain, imagenet, atol=1e-3)  # fine-tuned, not the ImageNet net itself


def test_local_weights_define_a_feature_space(tmp_path, scenario):
    import timm
    import torch

    from meddiffuse.quality.features import local_weights_extractor

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"resnet10t-{seed}.pth")
        torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), paths[-1])
    images, _ = scenario["real"].load_arrays("test")
    first, again, other = (extract_features(local_weights_extractor(p, "resnet10t"), images[:4])
                           for p in (paths[0], paths[0], paths[1]))
    assert first.shape == (4, 512)
    assert np.allclose(first, again, atol=1e-5) and not np.allclose(first, other, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        local_weights_extractor(tmp_path / "missing.pth", "resnet10t")
