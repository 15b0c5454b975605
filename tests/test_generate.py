"""The generator: config/UNet, training (loss, exact resume), seeded sampling, resumable generation,
sample grids, the MLflow pyfunc, and the CLI. Tiny preset at 16 px on phantoms, CPU only."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from meddiffuse.config import Settings
from meddiffuse.data.dataset import dataset_exists, decode_png, open_dataset
from meddiffuse.data.phantoms import phantom_dataset
from meddiffuse.domains import UnknownClassError, get_domain
from meddiffuse.generate import (
    CheckpointMismatch,
    GeneratorNotFound,
    IncompatibleGenerator,
    InvalidGeneratorRequest,
    class_seeds,
    create_generator_config,
    create_unet,
    generate_dataset,
    list_samplers,
    load_generator,
    sample_grid_png,
    snapshot_prefix,
    train_generator,
    write_sample_grids,
)
from meddiffuse.generate.artifact import write_generator_folder
from meddiffuse.generate.checkpoint import checkpoint_prefix, latest_checkpoint
from meddiffuse.generate.training import cpu_has_native_bf16, random_affine_intensity
from meddiffuse.store import LocalStore, sha256_hex
from tests import s3server

s3_server = s3server.s3_server  # the session's S3 server (moto or MinIO in a subprocess)

BRAIN = get_domain("brain-mri")
FAST = dict(steps=4, guidance=1.5)  # sampling settings that keep each call well under a second


class Interrupt(Exception):
    """Stands in for a killed process."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # on 2 shared cores, intra-op threads spin against other processes: 1 thread is many times faster
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store, settings (own MLflow SQLite) and a 16 px brain phantom dataset shared by the module."""
    home = tmp_path_factory.mktemp("generate-home")
    settings = Settings(home=home, store=str(home / "store"), tracking_uri="", registry_uri="", device="cpu")
    store = LocalStore(home / "store")
    real = phantom_dataset(store, "datasets/brain-phantom-16", BRAIN, n_per_class=12, resolution=16)
    return settings, store, real


def tiny(**overrides):
    return create_generator_config("tiny", BRAIN, 16, **overrides)


@pytest.fixture(scope="module")
def trained(env):
    """One tiny generator trained for 40 steps with MLflow tracking on."""
    settings, store, real = env
    info = train_generator(real, tiny(), store, "generators/brain-tiny", max_steps=40, max_minutes=None,
                           resume=False, checkpoint_every=20, seed=0, settings=settings, progress=False,
                           log_every=10)
    return info, load_generator("generators/brain-tiny", store, settings, device="cpu")


# -- config and model --------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["brain-mri", "all", "covid-ct"])
def test_presets_build_class_conditional_unets_sized_for_their_use(domain):
    d = get_domain(domain)
    sizes = {}
    for preset in ("tiny", "cpu-small", "gpu-base"):
        config = create_generator_config(preset, d)
        unet = create_unet(config)
        sizes[preset] = sum(p.numel() for p in unet.parameters())
        assert unet.config.in_channels == unet.config.out_channels == d.channels
        assert unet.config.num_class_embeds == d.num_classes + 1  # + the null class
        assert unet.config.sample_size == config.resolution
    assert sizes["tiny"] < sizes["cpu-small"] < sizes["gpu-base"]
    assert 1_000_000 < sizes["cpu-small"] < 10_000_000
    assert create_generator_config("gpu-base", d).resolution == 128
    assert create_generator_config("cpu-small", d, 64).resolution == 64


def test_tiny_unet_runs_for_real_and_null_labels():
    config = tiny()
    unet = create_unet(config)
    x = torch.randn(2, 1, 16, 16)
    out = unet(x, torch.tensor([10, 900]), class_labels=torch.tensor([0, config.null_class])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_configs_are_refused_with_the_reason():
    with pytest.raises(InvalidGeneratorRequest, match="unknown generator preset"):
        create_generator_config("huge", BRAIN)
    with pytest.raises(InvalidGeneratorRequest, match="divisible"):
        create_generator_config("cpu-small", BRAIN, 30)
    with pytest.raises(InvalidGeneratorRequest, match="attention_levels"):
        create_generator_config("tiny", BRAIN, attention_levels=(True,))


# -- training ----------------------------------------------------------------------------------------


def test_training_loss_falls_and_is_tracked_in_mlflow(env, trained):
    import mlflow

    settings, store, real = env
    info, gen = trained
    assert info.steps_trained == 40 and info.stopped_by == "steps"
    assert info.dataset_id == real.id and gen.meta.dataset_id == real.id
    losses = [loss for _, loss in info.loss_history]
    assert len(losses) == 4
    assert np.mean(losses[-2:]) < 0.7 * losses[0]

    client = mlflow.MlflowClient(tracking_uri=settings.resolved_tracking_uri)
    history = client.get_metric_history(info.run_id, "loss")
    assert [m.step for m in history] == [10, 20, 30, 40]
    assert [m.value for m in history] == pytest.approx(losses)
    run = client.get_run(info.run_id)
    assert run.data.params["prediction_type"] == "v_prediction"
    assert run.data.params["snr_gamma"] == "5.0"
    assert run.data.tags["dataset_id"] == real.id

    # the final model is committed last, with metadata describing it
    meta = gen.meta
    assert (meta.domain, meta.classes, meta.channels, meta.resolution) == ("brain-mri", BRAIN.classes, 1, 16)
    assert meta.steps_trained == 40 and meta.prediction_type == "v_prediction"
    assert store.list("generators/brain-tiny/model/")[-1].endswith("unet/diffusion_pytorch_model.safetensors")
    assert store.exists("generators/brain-tiny/model/generator.json")


def test_interrupted_then_resumed_run_ends_bit_identical(env):
    settings, store, real = env
    config = tiny(batch_size=8)
    common = dict(max_minutes=None, checkpoint_every=3, seed=3, settings=settings, progress=False, track=False)

    whole = train_generator(real, config, store, "generators/resume-a", max_steps=6, resume=False, **common)

    def kill_after_4(step):
        if step.step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_generator(real, config, store, "generators/resume-b", max_steps=6, resume=False,
                        on_step=kill_after_4, **common)
    assert latest_checkpoint(store, "generators/resume-b").step == 3
    with pytest.raises(GeneratorNotFound):  # no model until a run finishes
        load_generator("generators/resume-b", store, settings)

    resumed = train_generator(real, config, store, "generators/resume-b", max_steps=6, resume=True, **common)
    assert resumed.resumed_from_step == 3 and resumed.steps_trained == whole.steps_trained == 6

    # raw (non-EMA) weights of the final checkpoints, then the EMA weights of the saved models
    a, b = weights_at(store, "generators/resume-a", 6), weights_at(store, "generators/resume-b", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_generator("generators/resume-a", store, settings).unet.state_dict()
    ema_b = load_generator("generators/resume-b", store, settings).unet.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # the resumed half really trained: weights moved after the step-3 checkpoint
    at3 = weights_at(store, "generators/resume-b", 3)
    assert not all(torch.equal(at3[k], b[k]) for k in b)


def weights_at(store, prefix, step):
    return load_safetensors(store.get(f"{checkpoint_prefix(prefix, step)}/model.safetensors"))


def test_a_minutes_budget_fits_the_lr_horizon_to_the_time():
    from diffusers.optimization import get_scheduler

    from meddiffuse.generate.training import _refit_lr_schedule, fitted_horizon

    assert fitted_horizon(25, 0.5, 100.0, ceiling=10_000) == 25 + int(0.97 * 200)
    assert fitted_horizon(25, 0.5, 100.0, ceiling=100) == 100  # never past the preset's horizon
    assert fitted_horizon(25, 10.0, 0.0, ceiling=100) == 26  # out of time: the next step ends it
    # a running cosine schedule refitted from 1000 to 40 steps reaches zero at step 40, not 1000
    cfg = tiny(warmup_steps=5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=5, num_training_steps=1000)
    for _ in range(20):
        opt.step()
        sched.step()
    before = opt.param_groups[0]["lr"]
    assert _refit_lr_schedule(sched, opt, cfg, 40, num_processes=1)
    assert opt.param_groups[0]["lr"] < before  # halfway through a 40-step cosine, not 2% of 1000
    assert sched.get_last_lr()[0] == pytest.approx(opt.param_groups[0]["lr"])
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_minutes_only_run_ends_near_its_fitted_horizon(env):
    settings, store, real = env
    # a ceiling far beyond what 8 seconds allow: only the fit can bring the horizon down
    info = train_generator(real, tiny(train_steps=1_000_000, warmup_steps=2), store, "generators/minutes-fit",
                           max_minutes=8 / 60, checkpoint_every=10_000, seed=0, settings=settings,
                           progress=False, track=False)
    assert info.horizon is not None and 25 < info.horizon < 1_000_000
    # the schedule was sized for the budget: the run ends within a few steps of its horizon either way
    assert info.steps_trained >= 0.75 * info.horizon, (info.steps_trained, info.horizon, info.stopped_by)
    ckpt = latest_checkpoint(store, "generators/minutes-fit")
    assert ckpt is not None and ckpt.horizon == info.horizon  # a resume rebuilds the same schedule


def test_training_refuses_what_it_cannot_do_well(env, trained):
    settings, store, real = env
    common = dict(max_steps=2, max_minutes=None, checkpoint_every=1, seed=0, settings=settings,
                  progress=False, track=False)
    with pytest.raises(InvalidGeneratorRequest, match="resume=True"):  # never trains over a run
        train_generator(real, tiny(), store, "generators/brain-tiny", resume=False, **common)
    with pytest.raises(CheckpointMismatch, match="seed"):
        train_generator(real, tiny(), store, "generators/brain-tiny", resume=True, **{**common, "seed": 9})
    with pytest.raises(CheckpointMismatch, match="config"):
        train_generator(real, tiny(learning_rate=1e-4), store, "generators/brain-tiny", resume=True, **common)
    with pytest.raises(IncompatibleGenerator, match="upscaling"):
        train_generator(real, create_generator_config("tiny", BRAIN, 32), store, "generators/x",
                        resume=False, **common)
    with pytest.raises(IncompatibleGenerator, match="domain"):
        train_generator(real, create_generator_config("tiny", get_domain("covid-ct"), 16), store,
                        "generators/x", resume=False, **common)
    with pytest.raises(InvalidGeneratorRequest, match="max_steps"):
        train_generator(real, tiny(), store, "generators/x", resume=False, **{**common, "max_steps": 0})
    assert not store.list("generators/x/")  # refused requests leave nothing behind


# -- sampling ----------------------------------------------------------------------------------------


def test_same_seed_same_image_alone_or_in_any_batch(trained):
    _, gen = trained
    labels, seeds = [0, 1, 2, 3, 1], [11, 12, 13, 14, 15]
    # compared unquantised: rounding to uint8 would hide the 1e-6 drift of a batch-dependent kernel
    exact = dict(batch_size=4, output_type="float", **FAST)
    batch = gen.sample(labels, seeds, **exact)
    assert batch.shape == (5, 16, 16, 1) and batch.dtype == np.float32
    assert np.array_equal(batch, gen.sample(labels, seeds, **exact))
    alone = gen.sample([labels[3]], [seeds[3]], **exact)
    assert np.array_equal(alone[0], batch[3])
    shuffled = gen.sample(labels[::-1], seeds[::-1], **exact)
    assert np.array_equal(shuffled[::-1], batch)
    assert not np.array_equal(batch[1], batch[4])  # same class, different seeds
    pixels = gen.sample(labels, seeds, batch_size=4, **FAST)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, np.round(batch * 255).astype(np.uint8))


@pytest.mark.parametrize("sampler", list_samplers())
def test_every_sampler_is_seed_reproducible(trained, sampler):
    _, gen = trained
    a = gen.sample([0, 3, 2], [5, 6, 7], sampler=sampler, batch_size=3, output_type="float", **FAST)
    b = gen.sample([2], [7], sampler=sampler, batch_size=3, output_type="float", **FAST)
    assert np.array_equal(a[2], b[0])
    assert a.std() > 0


def test_guidance_changes_the_images(trained):
    _, gen = trained
    plain = gen.sample([0, 1], [1, 2], steps=4, guidance=0.0, batch_size=2)
    guided = gen.sample([0, 1], [1, 2], steps=4, guidance=3.0, batch_size=2)
    assert not np.array_equal(plain, guided)


def test_invalid_sampling_requests_say_what_is_wrong(trained):
    _, gen = trained
    with pytest.raises(InvalidGeneratorRequest, match="out of range"):
        gen.sample([4], [0])
    with pytest.raises(InvalidGeneratorRequest, match="one seed per image"):
        gen.sample([0, 1], [0])
    with pytest.raises(InvalidGeneratorRequest, match="steps"):
        gen.sample([0], [0], steps=0)
    with pytest.raises(InvalidGeneratorRequest, match="unknown sampler"):
        gen.sample([0], [0], sampler="euler-magic")
    with pytest.raises(InvalidGeneratorRequest, match="guidance"):
        gen.sample([0], [0], guidance=-1)
    with pytest.raises(UnknownClassError, match="not a class"):
        gen.sample_class("astrocytoma", 2, 0)
    with pytest.raises(IncompatibleGenerator, match="domain"):
        gen.check_compatible("all")
    with pytest.raises(IncompatibleGenerator, match="16 px"):
        gen.check_compatible(BRAIN, 64)
    gen.check_compatible("brain-mri", 16)  # and the right request passes


# -- synthetic datasets ------------------------------------------------------------------------------


def test_killed_generation_resumes_to_exactly_n_per_class(env, trained):
    settings, store, real = env
    _, gen = trained
    kwargs = dict(sampler="dpmsolver++", seed=7, shard_size=2, batch_size=2, generator_ref="generators/brain-tiny",
                  progress=False, **FAST)
    shards_seen = []

    def kill_after_3(shard, done, total):
        shards_seen.append(shard.name)
        if done == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_dataset(gen, store, "datasets/synthetic/kill", 3, on_shard=kill_after_3, **kwargs)
    assert not dataset_exists(store, "datasets/synthetic/kill")  # nothing visible until committed
    assert len(store.list("datasets/synthetic/kill/shards/")) == 3

    resumed_shards = []
    ds = generate_dataset(gen, store, "datasets/synthetic/kill", 3,
                          on_shard=lambda s, d, t: resumed_shards.append(s.name), **kwargs)
    assert len(resumed_shards) == 8 - 3 and not set(resumed_shards) & set(shards_seen)
    assert ds.manifest.counts()["train"] == {c: 3 for c in BRAIN.classes}
    seeds = [e.origin.seed for e in ds.manifest.entries]
    assert len(set(seeds)) == len(seeds) == 12
    assert not store.list("datasets/synthetic/kill/shards/")
    for entry in ds.manifest.entries:
        o = entry.origin
        assert (o.kind, o.generator, o.sampler, o.steps, o.guidance) == (
            "synthetic", "generators/brain-tiny", "dpmsolver++", 4, 1.5)
    # every image regenerates bit-for-bit from its label and seed alone
    entry = ds.manifest.entries[5]
    image = ds.load_image(entry)
    again = gen.sample([BRAIN.class_index(entry.label)], [entry.origin.seed], sampler=entry.origin.sampler,
                       batch_size=2, **FAST)
    assert np.array_equal(image, again[0])
    # and the resumed dataset equals one generated in a single go
    whole = generate_dataset(gen, store, "datasets/synthetic/whole", 3, **kwargs)
    assert [e.sha256 for e in whole.manifest.entries] == [e.sha256 for e in ds.manifest.entries]

    # a re-run of a committed plan is a no-op; another plan replaces the dataset without leftovers
    calls = []
    assert generate_dataset(gen, store, "datasets/synthetic/kill", 3, on_shard=lambda *a: calls.append(a),
                            **kwargs).id == ds.id and not calls
    smaller = generate_dataset(gen, store, "datasets/synthetic/kill", 1, **{**kwargs, "seed": 8})
    assert smaller.manifest.counts()["train"] == {c: 1 for c in BRAIN.classes}
    assert len(store.list("datasets/synthetic/kill/images/")) == 4


def test_generation_requests_are_validated(env, trained):
    settings, store, real = env
    _, gen = trained
    with pytest.raises(InvalidGeneratorRequest, match="positive"):
        generate_dataset(gen, store, "datasets/synthetic/bad", 0, progress=False)
    with pytest.raises(InvalidGeneratorRequest, match="steps"):
        generate_dataset(gen, store, "datasets/synthetic/bad", 2, steps=0, progress=False)
    with pytest.raises(UnknownClassError, match="not a class"):
        generate_dataset(gen, store, "datasets/synthetic/bad", 2, classes=["covid"], progress=False)
    with pytest.raises(InvalidGeneratorRequest, match="not a generated one"):  # never replaces real data
        generate_dataset(gen, store, real.prefix, 1, progress=False, **FAST)
    assert open_dataset(store, real.prefix).id == real.id
    assert not store.list("datasets/synthetic/bad/")
    only = generate_dataset(gen, store, "datasets/synthetic/only", 2, classes=["pituitary_tumor"],
                            progress=False, **FAST)
    assert only.manifest.counts()["train"] == {"glioma": 0, "meningioma": 0, "notumor": 0, "pituitary": 2}


def test_training_and_generation_resume_over_s3(s3_server, env):
    from meddiffuse.store.s3 import S3Store

    settings, _, _ = env
    store = S3Store(s3_server.new_bucket_name(), "meddiffuse", s3_server.config())
    real = phantom_dataset(store, "datasets/p", BRAIN, n_per_class=4, resolution=16)
    common = dict(max_steps=4, max_minutes=None, checkpoint_every=2, seed=1, settings=settings,
                  progress=False, track=False)

    def kill_at(n):
        def callback(*args):
            if (args[0].step if len(args) == 1 else args[1]) == n:
                raise Interrupt
        return callback

    with pytest.raises(Interrupt):
        train_generator(real, tiny(batch_size=4), store, "generators/s3", resume=False, on_step=kill_at(3),
                        **common)
    info = train_generator(real, tiny(batch_size=4), store, "generators/s3", resume=True, **common)
    assert (info.resumed_from_step, info.steps_trained) == (2, 4)
    gen = load_generator("generators/s3", store, settings, device="cpu")

    kwargs = dict(shard_size=1, batch_size=1, seed=2, progress=False, **FAST)
    with pytest.raises(Interrupt):
        generate_dataset(gen, store, "datasets/syn", 2, on_shard=kill_at(3), **kwargs)
    ds = generate_dataset(gen, store, "datasets/syn", 2, **kwargs)
    assert ds.manifest.counts()["train"] == {c: 2 for c in BRAIN.classes}
    assert len({e.origin.seed for e in ds.manifest.entries}) == 8
    assert all(sha256_hex(ds.read_bytes(e)) == e.sha256 for e in ds.manifest.entries)
    assert sorted(store.list("datasets/syn/")) == sorted(
        ["datasets/syn/manifest.json"] + [f"datasets/syn/{e.key}" for e in ds.manifest.entries])


# -- grids, folders, pyfunc --------------------------------------------------------------------------


def test_sample_grid_shows_generated_beside_real(env, trained):
    settings, store, real = env
    _, gen = trained
    alone = Image.open(io.BytesIO(sample_grid_png(gen, None, 3, label="glioma", **FAST)))
    beside = Image.open(io.BytesIO(sample_grid_png(gen, "glioma", per_class=3, real_dataset=real, **FAST)))
    everything = Image.open(io.BytesIO(sample_grid_png(gen, real, 3, **FAST)))
    assert beside.width > 1.8 * alone.width and beside.height == alone.height
    assert everything.width == beside.width and everything.height > 3.5 * beside.height
    from_arrays = sample_grid_png({"glioma": gen.sample_class("glioma", 3, 0, batch_size=3, **FAST)}, real, 3)
    assert from_arrays == sample_grid_png(gen, "glioma", 3, real_dataset=real, seed=0, batch_size=3, **FAST)
    keys = write_sample_grids(store, "reports/grids", gen, real, 2, **FAST)
    assert sorted(keys) == sorted(BRAIN.classes)
    assert all(Image.open(io.BytesIO(store.get(key))).size[0] > 0 for key in keys.values())


def test_a_local_folder_with_the_same_files_loads_the_same_generator(env, trained, tmp_path):
    settings, store, real = env
    _, gen = trained
    folder = write_generator_folder("generators/brain-tiny", store, tmp_path / "g")
    local = load_generator(str(folder), None, settings, device="cpu")
    assert local.id == gen.id
    assert np.array_equal(local.sample([1], [3], **FAST), gen.sample([1], [3], **FAST))
    with pytest.raises(GeneratorNotFound, match="no generator"):
        load_generator("generators/nope", store, settings)


def test_registered_pyfunc_makes_the_library_images(env, trained):
    import mlflow
    import pandas as pd

    from meddiffuse.generate.pyfunc import log_generator_model

    settings, store, real = env
    info, gen = trained
    version = log_generator_model("generators/brain-tiny", store=store, settings=settings,
                                  tags={"purpose": "test"})
    assert version.name == "meddiffuse-generator-brain-mri"
    mv = mlflow.MlflowClient().get_model_version(version.name, str(version.version))
    assert mv.tags["domain"] == "brain-mri" and mv.tags["resolution"] == "16"
    assert mv.tags["steps_trained"] == "40" and mv.tags["dataset_id"] == real.id
    assert mv.tags["classes"] == ",".join(BRAIN.classes) and mv.tags["purpose"] == "test"

    model = mlflow.pyfunc.load_model(version.uri)
    request = pd.DataFrame([{"class": "meningioma", "n": 2, "seed": 5, "steps": 4, "guidance": 1.5},
                            {"class": "notumor", "n": 1, "seed": 6, "steps": 4, "guidance": 1.5}])
    images = np.asarray(model.predict(request))
    expected = np.concatenate([gen.sample_class("meningioma", 2, 5, **FAST), gen.sample_class("notumor", 1, 6, **FAST)])
    assert np.array_equal(images, expected)
    # the registry URI also loads through the library
    via_registry = load_generator(version.uri, store, settings, device="cpu")
    assert via_registry.id == gen.id


def test_class_seeds_are_stable_and_distinct():
    assert class_seeds(1, 0, 3) == class_seeds(1, 0, 5)[:3]  # extending a run keeps its images
    assert class_seeds(1, 0, 3, start=3) == class_seeds(1, 0, 6)[3:]
    assert not set(class_seeds(1, 0, 50)) & set(class_seeds(1, 1, 50))
    assert class_seeds(1, 0, 3) != class_seeds(2, 0, 3)


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_trains_generates_and_refuses_clearly(env, trained, monkeypatch):
    from typer.testing import CliRunner

    from meddiffuse.cli import app

    settings, store, real = env
    for key, value in {"MEDDIFFUSE_HOME": str(settings.home), "MEDDIFFUSE_STORE": settings.store,
                       "MEDDIFFUSE_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()

    result = runner.invoke(app, ["train-generator", "--domain", "brain-mri", "--dataset", real.prefix,
                                 "--preset", "tiny", "--resolution", "16", "--steps", "3", "--name", "cli",
                                 "--checkpoint-every", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "generators/cli" in result.output
    result = runner.invoke(app, ["generate", "--domain", "brain-mri", "--generator", "generators/cli",
                                 "--per-class", "2", "--steps", "3", "--out", "datasets/synthetic/cli",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert open_dataset(store, "datasets/synthetic/cli").manifest.counts()["train"] == {
        c: 2 for c in BRAIN.classes}
    image = decode_png(store.get("datasets/synthetic/cli/" + open_dataset(
        store, "datasets/synthetic/cli").manifest.entries[0].key), 1)
    assert image.shape == (16, 16, 1)

    refusals = [
        (["generate", "-d", "brain-mri", "-g", "generators/cli", "-n", "0"], "positive"),
        (["generate", "-d", "all", "-g", "generators/cli", "-n", "2"], "trained for domain"),
        (["generate", "-d", "brain-mri", "-g", "generators/cli", "-n", "2", "--resolution", "64"], "16 px"),
        (["generate", "-d", "brain-mri", "-g", "generators/cli", "-n", "2", "--class", "covid"], "not a class"),
        (["generate", "-d", "brain-mri", "-g", "generators/cli", "-n", "2", "--steps", "0"], "steps"),
        (["generate", "-d", "brain-mri", "-g", "generators/missing", "-n", "2"], "no generator"),
        (["train-generator", "-d", "brain-mri", "--dataset", "datasets/none"], "no dataset"),
        (["train-generator", "-d", "brain-mri", "--dataset", real.prefix, "--preset", "tiny", "--resolution",
          "16", "--name", "cli", "--steps", "4"], "--resume"),
    ]
    for args, message in refusals:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_snapshots_and_ema_variants_come_from_one_run(env):
    """A scaling curve from one run: snapshots equal the EMA model a shorter run of the same recipe ends with
    (constant LR, so the schedule does not depend on the budget), and extra EMA decays sit beside them."""
    settings, store, real = env
    config = tiny(batch_size=8, lr_schedule="constant_with_warmup")
    common = dict(max_minutes=None, checkpoint_every=10, seed=1, settings=settings, progress=False, track=False)
    train_generator(real, config, store, "generators/curve", max_steps=6, snapshot_steps=[3], ema_variants=[0.0, 0.9],
                    **common)
    train_generator(real, config, store, "generators/curve-short", max_steps=3, **common)
    at3 = load_generator(snapshot_prefix("generators/curve", 3), store, settings).unet.state_dict()
    short = load_generator("generators/curve-short", store, settings).unet.state_dict()
    assert all(torch.equal(at3[k], short[k]) for k in short)
    final = load_generator("generators/curve", store, settings)
    assert final.meta.steps_trained == 6
    raw = load_generator(snapshot_prefix("generators/curve", 6, 0.0), store, settings).unet.state_dict()
    fast = load_generator(snapshot_prefix("generators/curve", 6, 0.9), store, settings).unet.state_dict()
    ema = final.unet.state_dict()
    # the raw weights are the checkpoint's; each EMA differs from them and from the other
    ckpt = weights_at(store, "generators/curve", 6)
    assert all(torch.equal(raw[k], ckpt[k]) for k in ckpt)
    assert not all(torch.equal(ema[k], fast[k]) for k in ema)
    assert not all(torch.equal(raw[k], fast[k]) for k in raw)
    with pytest.raises(InvalidGeneratorRequest, match="ema_variants"):
        train_generator(real, config, store, "generators/curve-bad", max_steps=2, ema_variants=[1.5], **common)


def test_a_resumed_run_keeps_its_ema_variants(env):
    """Extra EMA decays are checkpointed: killed and resumed, they end equal to an uninterrupted run's; a decay
    the checkpoint lacks starts from the restored weights instead of failing the resume."""
    settings, store, real = env
    config = tiny(batch_size=8, lr_schedule="constant_with_warmup")
    common = dict(max_minutes=None, checkpoint_every=3, seed=2, settings=settings, progress=False, track=False)
    train_generator(real, config, store, "generators/var-a", max_steps=6, ema_variants=[0.0, 0.9], **common)

    def kill_after_4(step):
        if step.step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_generator(real, config, store, "generators/var-b", max_steps=6, ema_variants=[0.0, 0.9],
                        on_step=kill_after_4, **common)
    # resumed with one more decay than the checkpoint holds
    train_generator(real, config, store, "generators/var-b", max_steps=6, ema_variants=[0.0, 0.9, 0.5],
                    resume=True, **common)

    def variant(prefix, decay):
        return load_generator(snapshot_prefix(prefix, 6, decay), store, settings).unet.state_dict()

    a, b = variant("generators/var-a", 0.9), variant("generators/var-b", 0.9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the 0.5 EMA restarted at step 3: it differs from the raw weights (it did average) but exists
    fresh, raw = variant("generators/var-b", 0.5), variant("generators/var-b", 0.0)
    assert not all(torch.equal(fresh[k], raw[k]) for k in raw)


def test_affine_intensity_augmentation_is_keyed_small_and_off_at_zero():
    x = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16).repeat(8, 1, 1, 1)
    a = random_affine_intensity(x, 1.0, torch.Generator().manual_seed(5))
    b = random_affine_intensity(x, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    changed = (a - x).abs().flatten(1).amax(1) > 0
    assert 0 < int(changed.sum()) < len(x)  # about half the batch, never all or none at this size
    assert float((a - x).abs().mean()) < 0.2  # small changes, not new images
    assert torch.allclose(random_affine_intensity(x, 0.0, torch.Generator().manual_seed(5)), x, atol=1e-5)
    # a config without the new field keeps the fingerprint it had before the field existed
    assert tiny(augment_strength=0.0).fingerprint() == tiny().fingerprint() != tiny(augment_strength=0.5).fingerprint()


def test_bf16_on_a_cpu_is_used_only_where_it_is_native_and_the_run_says_which(env):
    """``mixed_precision="bf16"`` trains under bf16 autocast on a CPU with AMX or AVX512-BF16 (1.6-1.75x
    faster there) and in float32 elsewhere (emulated bf16 is slower); "auto" is float32 on a CPU. The run records
    what it used, the saved weights are float32 either way, and the model samples as any other."""
    settings, store, real = env
    common = dict(max_steps=3, max_minutes=None, checkpoint_every=10, seed=3, settings=settings, progress=False,
                  track=False)
    asked = train_generator(real, tiny(batch_size=8, mixed_precision="bf16"), store, "generators/bf16", **common)
    plain = train_generator(real, tiny(batch_size=8), store, "generators/fp32", **common)
    native = cpu_has_native_bf16()
    assert plain.mixed_precision == "no"
    assert asked.mixed_precision == ("bf16" if native else "no")
    bf16, fp32 = (load_generator(p, store, settings) for p in ("generators/bf16", "generators/fp32"))
    assert all(p.dtype == torch.float32 for p in bf16.unet.parameters())
    a, b = bf16.unet.state_dict(), fp32.unet.state_dict()
    # same seed, same batches: only the arithmetic differs, so the weights differ exactly when bf16 ran
    assert all(torch.equal(a[k], b[k]) for k in a) is not native
    images = bf16.sample([0, 1], seeds=[0, 1], **FAST)
    assert images.shape[0] == 2 and images.dtype == np.uint8 and images.std() > 0
