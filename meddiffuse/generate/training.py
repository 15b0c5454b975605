"""Training the class-conditional diffusion UNet, in the style of diffusers' own training examples.

``accelerate`` places the model, runs mixed precision and DDP, and saves/loads the full training state;
``diffusers`` supplies the noise scheduler, the EMA (``EMAModel``) and the LR schedule
(``get_scheduler``). Every step's randomness (batch, flips, label dropout, timesteps, noise) comes from
a generator keyed by (seed, step, process), so a run resumed from a checkpoint ends bit-identical to one
that was never interrupted.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from meddiffuse.config import Settings
from meddiffuse.data.dataset import Dataset
from meddiffuse.generate.artifact import model_prefix, save_generator_model
from meddiffuse.generate.checkpoint import (
    CheckpointInfo,
    checkpoints_prefix,
    download_checkpoint,
    latest_checkpoint,
    upload_checkpoint,
)
from meddiffuse.generate.config import GeneratorConfig
from meddiffuse.generate.data import TrainingImages, check_dataset
from meddiffuse.generate.errors import CheckpointMismatch, InvalidGeneratorRequest
from meddiffuse.generate.metadata import GENERATOR_JSON, GeneratorMeta
from meddiffuse.generate.model import count_parameters, create_noise_scheduler, create_unet
from meddiffuse.generate.seeding import derive_seed
from meddiffuse.store.base import ObjectStore

logger = logging.getLogger(__name__)

EXPERIMENT = "meddiffuse-generator"


class TrainStep(BaseModel):
    """What a step callback sees after each optimisation step."""

    step: int
    loss: float
    lr: float
    images_per_second: float


StepCallback = Callable[[TrainStep], None]


class GeneratorInfo(BaseModel):
    """The outcome of ``train_generator``: where the model is and how it was trained."""

    ref: str = Field(description="Store prefix of the run; load it with load_generator(ref, store).")
    model_prefix: str
    store_uri: str
    domain: str
    classes: list[str]
    resolution: int
    preset: str
    parameters: int
    steps_trained: int
    resumed_from_step: int | None = None
    stopped_by: str = Field(description="'steps' (budget reached) or 'minutes' (wall clock).")
    dataset_id: str
    seed: int
    final_loss: float | None = None
    loss_history: list[tuple[int, float]] = Field(
        default_factory=list, description="(step, mean loss since the previous point) of this session"
    )
    images_per_second: float | None = None
    seconds: float
    horizon: int | None = Field(None, description="Cosine LR horizon in steps (fitted to --minutes when only "
                                                  "a wall-clock budget was given).")
    run_id: str | None = None
    mixed_precision: str = Field("no", description="The precision this session trained in: no (float32), bf16, fp16.")


def train_generator(
    dataset: Dataset,
    config: GeneratorConfig,
    store: ObjectStore,
    prefix: str,
    *,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    resume: bool = False,
    checkpoint_every: int = 500,
    seed: int = 0,
    settings: Settings | None = None,
    progress: bool = False,
    overwrite: bool = False,
    track: bool = True,
    log_every: int = 10,
    on_step: StepCallback | None = None,
    snapshot_steps: Sequence[int] = (),
    ema_variants: Sequence[float] = (),
) -> GeneratorInfo:
    """Train (or resume) a generator on ``dataset``'s train split; save the EMA model under ``<prefix>/model/``.

    Training stops at ``max_steps`` in total (default: ``config.train_steps``) or after ``max_minutes``
    of this session, whichever comes first; ``max_steps`` (else the resumed run's, else
    ``config.train_steps``) is also the cosine LR horizon. A fresh run with only ``max_minutes`` fits
    the horizon to the budget after its first steps (measured speed x remaining time), so the LR decays
    to zero as the time runs out instead of stopping early in a barely-decayed schedule. A checkpoint is committed every
    ``checkpoint_every`` steps and at the end; ``resume=True`` continues from the latest one exactly
    (same batches, noise and optimizer state) and refuses one made with another config, dataset or
    seed. Without ``resume``, an existing run at ``prefix`` is refused unless ``overwrite=True``.

    ``snapshot_steps`` also saves the EMA model at those steps under ``snapshot_prefix(prefix, step)``
    (one run gives a whole scaling curve; with a constant LR schedule each snapshot is the model a run
    of that budget would have been). ``ema_variants`` keeps extra EMAs with these decays (0 = the raw
    weights) beside the config's, saved with every snapshot and at the end under
    ``snapshot_prefix(prefix, step, decay)``: the EMA decay compared at no extra training. The extra
    EMAs are checkpointed too, so a resumed run's variants equal an uninterrupted run's; a decay the
    checkpoint lacks (added on resume, or a checkpoint from before variants were saved) starts from the
    restored weights.
    """
    _check_budget(max_steps, max_minutes, checkpoint_every, log_every)
    if any(not 0.0 <= d < 1.0 for d in ema_variants):
        raise InvalidGeneratorRequest(f"ema_variants must be decays in [0, 1), got {list(ema_variants)}")
    snapshots = {int(s) for s in snapshot_steps}
    check_dataset(dataset, config)
    settings = settings or Settings()
    prefix = prefix.strip("/")
    _check_target(store, prefix, resume, overwrite)
    started = time.monotonic()
    checkpoint = latest_checkpoint(store, prefix) if resume else None
    if checkpoint is not None:
        _check_checkpoint(checkpoint, config, dataset, seed)
    horizon = max_steps or (checkpoint.horizon if checkpoint else config.train_steps)
    stop_step = max_steps or horizon
    deadline = started + max_minutes * 60 if max_minutes else None

    accelerator, model, optimizer, lr_scheduler, ema, noise_scheduler = _build(config, settings, seed, horizon)
    step = 0
    saved_variants: dict[str, dict] = {}
    if checkpoint is not None:
        step, saved_variants = _restore(accelerator, store, prefix, checkpoint)
        ema.to(accelerator.device)  # accelerate loads custom state onto the CPU
        logger.info("resumed %s from step %d", prefix, step)
    resumed_from = step if checkpoint is not None else None

    variants = {d: _make_ema(accelerator.unwrap_model(model), config, d, foreach=True)  # vectorised: cheap
                for d in ema_variants if d > 0}
    for decay, variant in variants.items():
        if _variant_key(decay) in saved_variants:
            variant.load_state_dict(saved_variants[_variant_key(decay)])
            variant.to(accelerator.device)
    data = TrainingImages(dataset, config, accelerator.device)
    loop = _TrainingLoop(config, accelerator, model, optimizer, lr_scheduler, ema, noise_scheduler, data, seed,
                         list(variants.values()))

    def save_snapshots(at: int, final: bool) -> None:
        if not final:
            _save_final_model(accelerator, model, ema, noise_scheduler, config, store, snapshot_prefix(prefix, at),
                              at, dataset, seed)
        for decay in ema_variants:
            _save_final_model(accelerator, model, variants.get(decay), noise_scheduler, config, store,
                              snapshot_prefix(prefix, at, decay), at, dataset, seed)
    info_base = dict(
        ref=prefix, model_prefix=model_prefix(prefix), store_uri=store.uri, domain=config.domain,
        classes=list(config.classes), resolution=config.resolution, preset=config.preset,
        parameters=count_parameters(accelerator.unwrap_model(model)), dataset_id=dataset.id, seed=seed,
        resumed_from_step=resumed_from,
    )
    ckpt_info = CheckpointInfo(step=step, horizon=horizon, config_fingerprint=config.fingerprint(),
                               dataset_id=dataset.id, seed=seed, num_processes=accelerator.num_processes)
    params = {**config.model_dump(mode="json"), "seed": seed, "max_steps": max_steps, "max_minutes": max_minutes,
              "horizon": horizon, "dataset_id": dataset.id, "dataset_prefix": dataset.prefix,
              "parameters": info_base["parameters"], "resumed_from_step": resumed_from,
              "num_processes": accelerator.num_processes, "device": str(accelerator.device),
              "mixed_precision": "bf16" if loop.cpu_bf16 else accelerator.mixed_precision}
    tracker = _Tracker(track and accelerator.is_main_process, settings, prefix, config, dataset, params)

    history: list[tuple[int, float]] = []
    window: list[float] = []
    stopped_by = "steps"
    bar = tqdm(total=stop_step, initial=step, desc=f"training generator {config.domain}", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    images_per_s: float | None = None
    fit_horizon = deadline is not None and max_steps is None and checkpoint is None
    with tracker, bar:
        tick, tick_step = time.monotonic(), step
        while step < stop_step:
            if deadline is not None and time.monotonic() >= deadline:
                stopped_by = "minutes"
                break
            loss = loop.run_step(step)
            step += 1
            window.append(loss)
            now = time.monotonic()
            images_per_s = (step - tick_step) * config.batch_size * accelerator.num_processes / max(now - tick, 1e-9)
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
            if step % log_every == 0 or step == stop_step:
                mean = sum(window) / len(window)
                history.append((step, mean))
                tracker.log({"loss": mean, "lr": lr, "images_per_second": images_per_s}, step)
                window = []
                tick, tick_step = now, step
            if fit_horizon and step == FIT_FROM_STEP:
                fit_started = now
            elif fit_horizon and step == FIT_AT_STEP:
                fit_horizon = False
                per_step = (now - fit_started) / (FIT_AT_STEP - FIT_FROM_STEP)
                fitted = fitted_horizon(step, per_step, deadline - now, config.train_steps)
                if accelerator.num_processes > 1:  # all processes must share one schedule: the main one decides
                    from accelerate.utils import broadcast_object_list

                    fitted = broadcast_object_list([fitted])[0]
                if _refit_lr_schedule(lr_scheduler, optimizer, config, fitted, accelerator.num_processes):
                    horizon = stop_step = fitted
                    ckpt_info = ckpt_info.model_copy(update={"horizon": horizon})  # resume keeps this schedule
                    bar.total = stop_step
                    tracker.log({"lr_horizon": horizon}, step)
            if step % checkpoint_every == 0 and step < stop_step:
                _save_checkpoint(accelerator, store, prefix, ckpt_info.model_copy(update={"step": step}), variants)
            if step in snapshots:
                save_snapshots(step, final=False)
            if on_step is not None:
                on_step(TrainStep(step=step, loss=loss, lr=lr, images_per_second=images_per_s))
        if window:
            history.append((step, sum(window) / len(window)))
            tracker.log({"loss": history[-1][1]}, step)
        if resumed_from is None or step > resumed_from:
            _save_checkpoint(accelerator, store, prefix, ckpt_info.model_copy(update={"step": step}), variants)
        meta = _save_final_model(accelerator, model, ema, noise_scheduler, config, store, prefix, step,
                                 dataset, seed)
        if ema_variants and step not in snapshots:
            save_snapshots(step, final=True)
        tracker.finish(meta, step)

    return GeneratorInfo(
        **info_base, steps_trained=step, stopped_by=stopped_by,
        final_loss=history[-1][1] if history else None, loss_history=history,
        images_per_second=images_per_s, seconds=time.monotonic() - started, horizon=horizon,
        run_id=tracker.run_id, mixed_precision=params["mixed_precision"],
    )


# the horizon is fitted from the speed between these steps (the first few pay for warm-up allocations)
FIT_FROM_STEP, FIT_AT_STEP = 5, 25
FIT_MARGIN = 0.97  # end a little before the deadline: checkpoints and saving the model take time too


def fitted_horizon(step: int, seconds_per_step: float, seconds_left: float, ceiling: int) -> int:
    """Total steps that fit the remaining budget at the measured speed, within (step, ceiling]."""
    projected = step + int(FIT_MARGIN * seconds_left / max(seconds_per_step, 1e-9))
    return max(step + 1, min(ceiling, projected))


def _refit_lr_schedule(lr_scheduler, optimizer, config: GeneratorConfig, horizon: int, num_processes: int) -> bool:
    """Give the running LR schedule a new horizon in place (diffusers' schedules are LambdaLRs)."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not hasattr(inner, "lr_lambdas"):
        logger.warning("LR schedule %r has no lambdas; its horizon stays at %d", config.lr_schedule, horizon)
        return False
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only to build the lambdas
    fresh = get_scheduler(config.lr_schedule, dummy, num_warmup_steps=config.warmup_steps * num_processes,
                          num_training_steps=horizon * num_processes)
    inner.lr_lambdas = list(fresh.lr_lambdas) * len(optimizer.param_groups)
    for group, base, fn in zip(optimizer.param_groups, inner.base_lrs, inner.lr_lambdas, strict=True):
        group["lr"] = base * fn(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return True


def _build(config: GeneratorConfig, settings: Settings, seed: int, horizon: int):
    """Accelerator, prepared UNet/optimizer/LR schedule, EMA (registered for checkpoints), noise scheduler."""
    accelerator = _make_accelerator(config, settings)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(derive_seed("init", seed))
        unet = create_unet(config)
    ema = _make_ema(unet, config, config.ema_decay)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    # accelerate steps a prepared LR scheduler once per process per step, hence the factor
    lr_scheduler = get_scheduler(
        config.lr_schedule, optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=horizon * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    if config.compile:
        accelerator.unwrap_model(model).compile()  # in place: state-dict keys stay the same
    return accelerator, model, optimizer, lr_scheduler, ema, create_noise_scheduler(config)


def snapshot_prefix(prefix: str, step: int, ema_decay: float | None = None) -> str:
    """Store prefix of a run's snapshot at ``step`` (``ema_decay``: of that EMA variant; 0 = raw weights)."""
    tail = "" if ema_decay is None else f"-ema{ema_decay:g}"
    return f"{prefix.strip('/')}/snapshots/step-{step:06d}{tail}"


def _make_ema(unet: UNet2DModel, config: GeneratorConfig, decay: float, foreach: bool = False) -> EMAModel:
    return EMAModel(
        unet.parameters(), decay=decay, use_ema_warmup=True, inv_gamma=1.0,
        power=config.ema_power, model_cls=UNet2DModel, model_config=unet.config, foreach=foreach,
    )


class _TrainingLoop:
    """One optimisation step: keyed randomness, v/epsilon target, min-SNR weighting, clip, EMA."""

    def __init__(self, config, accelerator, model, optimizer, lr_scheduler, ema, noise_scheduler, data, seed,
                 ema_variants=()):
        self.config = config
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.noise_scheduler = noise_scheduler
        self.data = data
        self.seed = seed
        self.flip_dims = _flip_dims(config) if config.augment else []
        self.cpu_bf16 = cpu_bf16(config, accelerator)
        self.ema_variants = list(ema_variants)

    def run_step(self, step: int) -> float:
        cfg, acc = self.config, self.accelerator
        rank, world, batch = acc.process_index, acc.num_processes, cfg.batch_size
        index = self.data.indices((step * world + rank) * batch, batch, self.seed)
        x0, labels = self.data.batch(index)
        gen = torch.Generator(device=acc.device).manual_seed(derive_seed("train", self.seed, step, rank))
        x0 = _random_flips(x0, self.flip_dims, gen)
        if cfg.augment and cfg.augment_strength > 0:
            x0 = random_affine_intensity(x0, cfg.augment_strength, gen)
        drop = torch.rand(batch, generator=gen, device=acc.device) < cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, cfg.null_class), labels)
        timesteps = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=gen, device=acc.device)
        noise = torch.randn(x0.shape, generator=gen, device=acc.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        if cfg.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise

        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
            pred = self.model(noisy, timesteps, class_labels=labels).sample
        loss = diffusion_loss(pred, target, timesteps, self.noise_scheduler, cfg)
        acc.backward(loss)
        if cfg.grad_clip is not None and acc.sync_gradients:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(acc.unwrap_model(self.model).parameters())
        for variant in self.ema_variants:
            variant.step(acc.unwrap_model(self.model).parameters())
        return float(loss.detach().item())


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    config: GeneratorConfig,
) -> torch.Tensor:
    """MSE to the target, weighted per sample by min-SNR-γ (Hang et al. 2023) when configured."""
    mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if config.snr_gamma is None:
        return mse.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = snr.clamp(max=config.snr_gamma)
    # v-prediction's loss is already scaled by (snr + 1) relative to x0-MSE; epsilon's by snr
    weight = clipped / (snr + 1) if config.prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)
    return (mse * weight).mean()


def _flip_dims(config: GeneratorConfig) -> list[int]:
    from meddiffuse.domains import get_domain

    try:
        domain = get_domain(config.domain)
    except KeyError:  # custom domain: flips are not known to be label-safe
        return []
    return ([3] if domain.hflip else []) + ([2] if domain.vflip else [])


def _random_flips(x: torch.Tensor, dims: list[int], gen: torch.Generator) -> torch.Tensor:
    for dim in dims:
        flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(dim), x)
    return x


def random_affine_intensity(x: torch.Tensor, strength: float, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Small label-preserving changes to a share ``p`` of a [-1, 1] batch: rotation up to 10°·s, scale and
    translation up to 10%·s and 5%·s, brightness and contrast up to 10%·s. Small enough to stay plausible
    anatomy (the generator may reproduce them), so no augmentation condition is needed; borders are
    replicated, so black MRI/CT backgrounds and pale smear backgrounds both stay as they are."""
    n, device = x.shape[0], x.device

    def uniform() -> torch.Tensor:  # in [-1, 1), from the step's keyed generator
        return torch.rand(n, generator=gen, device=device) * 2 - 1

    apply = torch.rand(n, generator=gen, device=device) < p
    angle, scale = uniform() * math.radians(10 * strength), 1 + uniform() * 0.1 * strength
    shift = torch.stack([uniform(), uniform()], dim=1) * 0.1 * strength  # 5% of the side in [-1, 1] units
    contrast, brightness = 1 + uniform() * 0.1 * strength, uniform() * 0.2 * strength  # 10% of the range
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    moved = ((moved - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]).clamp(-1, 1)
    return torch.where(apply[:, None, None, None], moved, x)


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 units that oneDNN uses under autocast: "amx" (Intel AMX tiles), "avx512_bf16"
    (the AVX512-BF16 dot products of AMD Zen 4, Cooper Lake and later Xeons), or None (bf16 is emulated)."""
    for units, name in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, name, None)  # private helpers, so looked up defensively
        if check is not None and check():
            return units
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (`cpu_bf16_units`). A cpu-small training step ran 1.75x faster
    under autocast with AMX (Intel Xeon) and 1.63x with AVX512-BF16 alone (AMD EPYC, Zen 4); without either,
    bf16 is emulated and an earlier machine ran it slower than float32."""
    return cpu_bf16_units() is not None


def cpu_bf16(config: GeneratorConfig, accelerator: Accelerator) -> bool:
    """Train under bf16 autocast on this CPU? Only where asked and the CPU computes bf16 natively (AMX or
    AVX512-BF16): there it trains cpu-small 1.6-1.75x faster than float32; elsewhere it is emulated and slower.
    The loop autocasts itself because accelerate fixes one precision per process (a second Accelerator with
    another one raises), and a process may train generators of both kinds."""
    return accelerator.device.type == "cpu" and config.mixed_precision == "bf16" and cpu_has_native_bf16()


def _make_accelerator(config: GeneratorConfig, settings: Settings) -> Accelerator:
    device = settings.torch_device()
    mixed = config.mixed_precision
    if device == "cpu":
        mixed = "no"  # CPU bf16 is the loop's own autocast (cpu_bf16): accelerate's precision is one per process
    elif mixed == "auto":
        mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Accelerator(mixed_precision=mixed, cpu=device == "cpu")


def _check_budget(max_steps, max_minutes, checkpoint_every, log_every) -> None:
    if max_steps is not None and max_steps <= 0:
        raise InvalidGeneratorRequest(f"max_steps must be positive, got {max_steps}")
    if max_minutes is not None and not max_minutes > 0:
        raise InvalidGeneratorRequest(f"max_minutes must be positive, got {max_minutes}")
    if checkpoint_every <= 0:
        raise InvalidGeneratorRequest(f"checkpoint_every must be positive, got {checkpoint_every}")
    if log_every <= 0:
        raise InvalidGeneratorRequest(f"log_every must be positive, got {log_every}")


def _check_target(store: ObjectStore, prefix: str, resume: bool, overwrite: bool) -> None:
    """Never silently train over an existing run: resume it, overwrite it on request, or refuse."""
    if not prefix:
        raise InvalidGeneratorRequest("the generator prefix must not be empty")
    existing = store.list(f"{checkpoints_prefix(prefix)}/") or store.exists(
        f"{model_prefix(prefix)}/{GENERATOR_JSON}"
    )
    if not existing or resume:
        return
    if overwrite:
        store.delete_prefix(f"{prefix}/")
        return
    raise InvalidGeneratorRequest(
        f"{prefix!r} already holds a generator or its checkpoints in {store.uri}; pass resume=True "
        "(--resume) to continue it, overwrite=True (--overwrite) to replace it, or choose another name"
    )


def _check_checkpoint(info: CheckpointInfo, config: GeneratorConfig, dataset: Dataset, seed: int) -> None:
    problems = []
    if info.config_fingerprint != config.fingerprint():
        problems.append("a different generator config")
    if info.dataset_id != dataset.id:
        problems.append(f"dataset {info.dataset_id} (this one is {dataset.id})")
    if info.seed != seed:
        problems.append(f"seed {info.seed} (this run has seed {seed})")
    if problems:
        raise CheckpointMismatch(
            f"the checkpoint at step {info.step} was made with " + ", ".join(problems)
            + "; resume with the original settings, or start over with overwrite=True (--overwrite)"
        )


def _local_state_dir(store: ObjectStore, prefix: str, step: int) -> Path:
    # the same path on every process of a node, so accelerate's per-process RNG files meet in one folder
    key = derive_seed(store.uri, prefix, step)
    return Path(tempfile.gettempdir()) / f"meddiffuse-state-{key:x}"


# the extra EMA decays of a checkpoint, beside accelerate's own files (not registered with accelerate, whose
# load_state needs exactly the objects it saved: a resume may ask for other decays than the run saved)
EMA_VARIANTS_FILE = "ema_variants.pt"


def _variant_key(decay: float) -> str:
    return f"{decay:g}"


def _save_checkpoint(accelerator: Accelerator, store: ObjectStore, prefix: str, info: CheckpointInfo,
                     variants: dict[float, EMAModel] | None = None) -> None:
    local = _local_state_dir(store, prefix, info.step)
    shutil.rmtree(local, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(local))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if variants:
            torch.save({_variant_key(d): v.state_dict() for d, v in variants.items()}, local / EMA_VARIANTS_FILE)
        upload_checkpoint(store, prefix, local, info)
        shutil.rmtree(local, ignore_errors=True)
    accelerator.wait_for_everyone()


def _restore(accelerator: Accelerator, store: ObjectStore, prefix: str,
             info: CheckpointInfo) -> tuple[int, dict[str, dict]]:
    """Load a checkpoint into the prepared objects; returns its step and its extra EMAs' states by decay."""
    local = _local_state_dir(store, prefix, info.step)
    if accelerator.is_main_process:
        shutil.rmtree(local, ignore_errors=True)
        download_checkpoint(store, prefix, info, local)
    accelerator.wait_for_everyone()
    try:
        accelerator.load_state(str(local))
        saved = local / EMA_VARIANTS_FILE
        variants = torch.load(saved, map_location="cpu", weights_only=True) if saved.exists() else {}
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(local, ignore_errors=True)
    return info.step, variants


def _save_final_model(accelerator, model, ema, noise_scheduler, config, store, prefix, step, dataset, seed):
    """Copy the EMA weights (``ema=None``: the raw weights) into a fresh UNet and save it with its metadata
    (main process only)."""
    meta = GeneratorMeta(
        domain=config.domain, classes=list(config.classes), channels=config.channels,
        resolution=config.resolution, prediction_type=config.prediction_type, config=config,
        steps_trained=step, dataset_id=dataset.id, dataset_prefix=dataset.prefix, seed=seed,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = create_unet(config)
        if ema is None:
            unet.load_state_dict(accelerator.unwrap_model(model).state_dict())
        else:
            ema.copy_to(unet.parameters())
        meta = save_generator_model(unet, noise_scheduler, meta, store, prefix)
    accelerator.wait_for_everyone()
    return meta


class _Tracker:
    """MLflow run for a training session (no-op when tracking is off or on non-main processes)."""

    def __init__(self, enabled, settings, prefix, config, dataset, params) -> None:
        self.enabled = enabled
        self.settings = settings
        self.prefix = prefix
        self.tags = {"domain": config.domain, "preset": config.preset, "dataset_id": dataset.id,
                     "generator_prefix": prefix, "kind": "generator-training"}
        self.params = params
        self.run_id: str | None = None
        self._ctx = None

    def __enter__(self) -> _Tracker:
        if self.enabled:
            from meddiffuse.store.tracking import tracked_run

            self._ctx = tracked_run(EXPERIMENT, self.prefix.rsplit("/", 1)[-1], self.settings,
                                    tags=self.tags, params=self.params)
            self.run_id = self._ctx.__enter__().info.run_id
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def finish(self, meta: GeneratorMeta, step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metric("steps_trained", step, step=step)
            mlflow.log_dict(meta.model_dump(mode="json"), GENERATOR_JSON)

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
