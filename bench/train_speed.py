"""Diffusion training speed of our loop against a minimal diffusers-example loop, and the UNet's FLOP rate.

1. Training images/s: ``train_generator`` (accelerate, EMA, min-SNR weighting, flips, label dropout,
   gradient clipping, LR schedule, tracking off, no checkpoint until the end) against a minimal loop in
   the style of diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (plain
   AdamW + LR schedule + gradient clipping, ``noise_scheduler.add_noise``, MSE on the same target,
   class labels passed; no EMA, no accelerate), on the same UNet, batch size and resolution and the same
   in-memory images. Each repeat times ``--steps`` steps after ``--warmup`` untimed ones; the two loops
   alternate (ABBA) so that load on a shared machine falls on both; figures are medians over repeats.
2. UNet forward FLOP rate: FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` (a
   multiply-add counts 2; convolutions, matmuls and attention; norms and activations are not counted),
   divided by the median forward time, against the CPU's fp32 peak
   = cores x clock x FLOP/cycle/core, FLOP/cycle/core = 2 (FMA) x SIMD fp32 lanes x FMA units
   (AVX-512: 16 lanes, AVX2: 8; 2 FMA units per core assumed, as on Xeon Scalable Gold/Platinum).
   Levers tried, each recorded: batch size, thread count, channels_last, bf16 autocast (if the CPU has
   avx512_bf16/AMX), torch.compile; timed round-robin so that outside load falls on all alike.
   For scale, a plain fp32 2048 x 2048 matmul is timed per thread count in the same run.
Target: UNet forward at >= 30% of the CPU's fp32 peak. Writes bench/results/train-speed.json.

    python bench/train_speed.py --scale small   # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import real_data, write_result  # noqa: E402
from meddiffuse.config import Settings  # noqa: E402
from meddiffuse.data.ingest import ingest_folder  # noqa: E402
from meddiffuse.data.phantoms import write_phantom_folder  # noqa: E402
from meddiffuse.domains import get_domain  # noqa: E402
from meddiffuse.generate import create_generator_config, create_unet, train_generator  # noqa: E402
from meddiffuse.generate.model import count_parameters  # noqa: E402
from meddiffuse.generate.training import cpu_has_native_bf16  # noqa: E402
from meddiffuse.store import LocalStore  # noqa: E402

SMALL: dict[str, Any] = {"preset": "cpu-small", "resolution": 32, "batch_size": 64, "warmup": 3, "steps": 8,
                         "repeats": 3, "forward_batches": [16, 64, 128, 256], "forward_repeats": 5}
FULL: dict[str, Any] = {"preset": "cpu-small", "resolution": 32, "batch_size": 64, "warmup": 5, "steps": 20,
                        "repeats": 5, "forward_batches": [16, 64, 128, 256, 512], "forward_repeats": 10}
FULL_GPU: dict[str, Any] = {"preset": "gpu-base", "resolution": 64, "batch_size": 64, "warmup": 10, "steps": 50,
                            "repeats": 5, "forward_batches": [16, 64, 128, 256], "forward_repeats": 20}
TARGET_PEAK_SHARE = 0.30
FMA_UNITS_ASSUMED = 2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="small", choices=["small", "full"])
    p.add_argument("--domain", default="brain-mri", choices=["brain-mri", "all", "covid-ct"])
    p.add_argument("--preset", help="generator preset (default: cpu-small; gpu-base for full scale on a GPU)")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="untimed steps per repeat")
    p.add_argument("--steps", type=int, help="timed steps per repeat")
    p.add_argument("--repeats", type=int)
    p.add_argument("--forward-repeats", type=int, help="timed forward passes per lever (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile lever (minutes to compile)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    scale = dict(SMALL if a.scale == "small" else FULL_GPU if cuda else FULL)
    for key in ("preset", "resolution", "batch_size", "warmup", "steps", "repeats", "forward_repeats"):
        if getattr(a, key) is not None:
            scale[key] = getattr(a, key)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.monotonic()
    device = torch.device("cuda" if cuda else "cpu")

    domain = get_domain(a.domain)
    work = Path(tempfile.mkdtemp(prefix="bench-train-speed-"))
    settings = Settings(home=work / "home")
    store = LocalStore(work / "store")
    folder, source = real_data(domain.name), "real"
    if folder is None:
        folder, source = write_phantom_folder(domain, work / "phantoms", 150, size=64, seed=a.seed), "phantom"
    real, _ = ingest_folder(folder, domain, store, "datasets/real", resolution=scale["resolution"],
                            train_fraction=0.2, seed=a.seed)
    cfg = create_generator_config(scale["preset"], domain, scale["resolution"], batch_size=scale["batch_size"])
    batch, warmup, steps = cfg.batch_size, scale["warmup"], scale["steps"]

    # -- 1. training loops, alternating ---------------------------------------------------------------
    images, labels = real.load_arrays("train")
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)
    y_all = torch.from_numpy(labels).to(device)
    runs: dict[str, list[float]] = {"ours": [], "minimal": []}
    for r in range(scale["repeats"]):
        for arm in (("ours", "minimal") if r % 2 == 0 else ("minimal", "ours")):
            if arm == "ours":
                ips = ours_loop(real, cfg, store, settings, f"generators/speed-{r}", warmup, steps, a.seed)
            else:
                ips = minimal_loop(cfg, x_all, y_all, device, warmup, steps, a.seed + r)
            runs[arm].append(ips)
            print(f"[train-speed] repeat {r + 1}/{scale['repeats']} {arm}: {ips:.1f} images/s", flush=True)
    ours_ips, minimal_ips = statistics.median(runs["ours"]), statistics.median(runs["minimal"])
    paired = [o / m for o, m in zip(runs["ours"], runs["minimal"], strict=True)]

    # -- 2. FLOPs and forward levers --------------------------------------------------------------------
    unet = create_unet(cfg).to(device)
    fwd_flops_per_image = count_forward_flops(unet, cfg, 8, device) / 8
    step_flops = count_train_step_flops(unet, cfg, batch, device)
    peak = gpu_peak() if cuda else cpu_peak()
    levers = forward_levers(cfg, device, scale["forward_batches"], scale["forward_repeats"], fwd_flops_per_image,
                            peak.get("gflops_fp32"), compile_lever=not a.no_compile)
    sgemm = sgemm_reference(device)
    fp32 = [v for v in levers if v.get("dtype") == "float32" and v.get("gflops")]
    best = max(fp32, key=lambda v: v["gflops"]) if fp32 else None
    base = next((v for v in levers if v["name"] == "baseline"), None)
    share = best["percent_of_peak"] / 100 if best and best.get("percent_of_peak") is not None else None

    targets = [{
        "target": f"UNet forward >= {TARGET_PEAK_SHARE:.0%} of the CPU's fp32 peak",
        "measured": (f"{share:.1%} ({best['name']}, {best['gflops']:.1f} GFLOP/s of {peak['gflops_fp32']:.0f})"
                     if share is not None else "no CPU peak on this device"),
        "met": share is not None and share >= TARGET_PEAK_SHARE,
    }]
    path = write_result("train-speed", {
        "scale": a.scale, "device": str(device), "data": source, "domain": a.domain, "seed": a.seed,
        "threads": torch.get_num_threads(),
        "unet": {"preset": cfg.preset, "resolution": cfg.resolution, "parameters": count_parameters(unet),
                 "block_out_channels": list(cfg.block_out_channels), "channels": cfg.channels},
        "budget": {"batch_size": batch, "warmup_steps": warmup, "timed_steps": steps, "repeats": scale["repeats"],
                   "forward_repeats": scale["forward_repeats"]},
        "training": {
            "ours": {"images_per_second": ours_ips, "runs": runs["ours"],
                     "loop": "meddiffuse train_generator (accelerate, EMA, min-SNR, flips, label dropout, clip)"},
            "minimal": {"images_per_second": minimal_ips, "runs": runs["minimal"],
                        "loop": "diffusers train_unconditional.py style (AdamW, add_noise, MSE, clip, LR schedule)"},
            "ratio_ours_to_minimal": ours_ips / minimal_ips, "paired_ratios": paired,
            "train_step_gflop": step_flops / 1e9,
            "ours_gflops": step_flops / 1e9 * ours_ips / batch,
            "minimal_gflops": step_flops / 1e9 * minimal_ips / batch,
        },
        "forward": {"flops_per_image": fwd_flops_per_image, "gflop_per_image": fwd_flops_per_image / 1e9,
                    "baseline": base, "best_fp32": best, "levers": levers},
        "peak": peak,
        "sgemm_reference": sgemm,
        "targets": targets,
        "notes": "Training loops alternate ABBA so load from other processes falls on both; absolute figures on a "
                 "shared CPU are noisy, the ratio less so. FLOPs count convolutions, matmuls and attention "
                 "(multiply-add = 2); GroupNorm/SiLU/elementwise work is real time but zero counted FLOPs.",
        "minutes_total": round((time.monotonic() - t_start) / 60, 1),
    })
    print(f"[train-speed] ours {ours_ips:.1f} vs minimal {minimal_ips:.1f} images/s "
          f"({ours_ips / minimal_ips:.2f}x); best forward {best and best['gflops']:.1f} GFLOP/s -> {path}")


# -- training loops ------------------------------------------------------------------------------------
def ours_loop(real, cfg, store, settings, prefix: str, warmup: int, steps: int, seed: int) -> float:
    """images/s of ``train_generator`` over ``steps`` steps after ``warmup`` (timestamps from on_step)."""
    stamps: list[float] = []

    def on_step(_step) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    train_generator(real, cfg, store, prefix, max_steps=warmup + steps, checkpoint_every=10**6, seed=seed,
                    settings=settings, progress=False, overwrite=True, track=False, on_step=on_step)
    return steps * cfg.batch_size / (stamps[warmup + steps - 1] - stamps[warmup - 1])


def minimal_loop(cfg, x_all: torch.Tensor, y_all: torch.Tensor, device: torch.device, warmup: int, steps: int,
                 seed: int) -> float:
    """The diffusers training example's loop, reduced to its essentials, on the same UNet and data."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    torch.manual_seed(seed)
    model = create_unet(cfg).to(device).train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                    prediction_type=cfg.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=warmup + steps)
    autocast = _autocast(device)
    batch = cfg.batch_size
    stamps = []
    for _ in range(warmup + steps):
        idx = torch.randint(0, len(y_all), (batch,), device=device)
        clean, labels = x_all[idx], y_all[idx]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = (noise_scheduler.get_velocity(clean, noise, timesteps)
                  if cfg.prediction_type == "v_prediction" else noise)
        with autocast:
            pred = model(noisy, timesteps, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        loss.detach().item()  # the example logs the loss every step (and this syncs a GPU)
        stamps.append(time.perf_counter())
    return steps * batch / (stamps[-1] - stamps[warmup - 1])


def _autocast(device: torch.device):
    """Match train_generator's default precision ("auto"): bf16/fp16 autocast on CUDA, float32 on the CPU (the
    cpu-study preset's bf16 on AMX CPUs is the "bf16 autocast" lever row)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


# -- FLOPs ---------------------------------------------------------------------------------------------
def _inputs(cfg, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.channels, cfg.resolution, cfg.resolution, generator=g).to(device)
    t = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    return x, t, y


def count_forward_flops(unet, cfg, batch: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = _inputs(cfg, batch, device)
    unet.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, t, class_labels=y)
    return float(counter.get_total_flops())


def count_train_step_flops(unet, cfg, batch: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one training step (optimizer update not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = _inputs(cfg, batch, device)
    unet.train()
    with FlopCounterMode(display=False) as counter:
        unet(x, t, class_labels=y).sample.pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# -- peak ----------------------------------------------------------------------------------------------
def cpu_peak() -> dict[str, Any]:
    """fp32 peak = cores x clock x 2 (FMA) x SIMD lanes x FMA units, with where each factor came from."""
    flags: set[str] = set()
    mhz: float | None = None
    mhz_source = None
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and mhz is None:
                mhz, mhz_source = float(value), "/proc/cpuinfo cpu MHz"
            elif key == "model name" and model is None:
                model = value.strip()
    except OSError:
        pass
    try:  # the rated maximum, where the hypervisor exposes it, beats the momentary clock
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("CPU max MHz:"):
                mhz, mhz_source = float(line.split(":", 1)[1]), "lscpu CPU max MHz"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    cores = os.cpu_count() or 1
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 4
    fma = "fma" in flags or "avx512f" in flags
    per_cycle = (2 if fma else 1) * lanes * FMA_UNITS_ASSUMED
    gflops = cores * (mhz or 0) / 1000 * per_cycle if mhz else None
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return {
        "model": model, "cores": cores, "mhz": mhz, "mhz_source": mhz_source, "simd_fp32_lanes": lanes,
        "fma": fma, "fma_units_per_core": FMA_UNITS_ASSUMED, "flop_per_cycle_per_core": per_cycle,
        "gflops_fp32": gflops, "bf16_instructions": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "bf16_autocast_supported": bf16,
        # the library's own question (native bf16: AMX or AVX512-BF16): where False, cpu-study trains in float32
        "bf16_native_for_recipe": cpu_has_native_bf16(),
        "assumption": (f"FLOP/cycle/core = 2 (FMA) x {lanes} fp32 lanes x {FMA_UNITS_ASSUMED} FMA units (assumed: "
                       "Xeon Scalable Gold/Platinum have two AVX-512 FMA ports); cores = os.cpu_count() (vCPUs); "
                       "clock = nominal/current, turbo and AVX-512 frequency offsets ignored"),
    }


def gpu_peak() -> dict[str, Any]:
    return {"model": torch.cuda.get_device_name(0), "gflops_fp32": None, "bf16_autocast_supported": True,
            "assumption": "no table of GPU peaks: FLOP/s reported without a share of peak"}


def sgemm_reference(device: torch.device, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a plain fp32 n x n matmul per thread count: what this machine delivers in practice."""
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    counts = sorted({1, os.cpu_count() or 1}) if device.type == "cpu" else [threads]
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    try:
        for count in counts:
            torch.set_num_threads(count)
            torch.mm(a, b)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"{count} thread(s)"] = 2 * n**3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(threads)
    return out


# -- forward levers ---------------------------------------------------------------------------------------
def forward_levers(cfg, device: torch.device, batches: list[int], repeats: int, flops_per_image: float,
                   peak_gflops: float | None, compile_lever: bool) -> list[dict[str, Any]]:
    """Median forward time under each lever, one change at a time from the baseline (float32, batch 64).

    The levers are timed round-robin (one call of each per round), so load from other processes on a
    shared machine falls on all of them alike rather than on whichever lever ran at the time.
    """
    threads = torch.get_num_threads()
    base_batch = 64 if 64 in batches else batches[0]
    variants: list[dict[str, Any]] = [dict(name="baseline", batch=base_batch)]
    variants += [dict(name=f"batch {b}", batch=b) for b in batches if b != base_batch]
    if device.type == "cpu" and (os.cpu_count() or 1) > 1:
        other = 1 if threads > 1 else os.cpu_count()
        variants.append(dict(name=f"{other} thread(s)", batch=base_batch, threads=other))
    variants.append(dict(name="channels_last", batch=base_batch, channels_last=True))
    if device.type == "cuda" or cpu_peak()["bf16_autocast_supported"]:
        variants.append(dict(name="bf16 autocast", batch=base_batch, dtype="bfloat16"))
    if compile_lever:
        variants.append(dict(name="torch.compile", batch=base_batch, compiled=True))
    levers, out = [], {}
    for v in variants:
        print(f"[train-speed] forward lever: {v['name']} (warm-up)", flush=True)
        try:
            levers.append(_Lever(cfg, device, threads, **v))
        except Exception as exc:  # noqa: BLE001 - a lever that fails is recorded, not fatal
            out[v["name"]] = {**v, "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            torch.set_num_threads(threads)
    print(f"[train-speed] timing {len(levers)} levers round-robin, {repeats} rounds", flush=True)
    try:
        for _ in range(repeats):
            for lever in levers:
                lever.times.append(lever.call())
    finally:
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    for lever in levers:
        median = statistics.median(lever.times)
        gflops = flops_per_image * lever.batch / median / 1e9
        out[lever.name] = {
            "name": lever.name, "batch": lever.batch, "threads": lever.threads, "channels_last": lever.channels_last,
            "dtype": lever.dtype, "compiled": lever.compiled, "compile_seconds": lever.compile_seconds,
            "seconds_median": median, "seconds": lever.times, "images_per_second": lever.batch / median,
            "gflops": gflops, "percent_of_peak": 100 * gflops / peak_gflops if peak_gflops else None,
            # share of the peak of the cores this lever's threads can use (1 thread: one core's peak)
            "percent_of_used_cores_peak": (100 * gflops / (peak_gflops * min(lever.threads, cores) / cores)
                                           if peak_gflops else None),
        }
    return [out[v["name"]] for v in variants if v["name"] in out]


class _Lever:
    """One forward configuration: its own UNet and inputs, warmed up (and compiled) on construction."""

    def __init__(self, cfg, device: torch.device, default_threads: int, *, name: str, batch: int,
                 threads: int | None = None, channels_last: bool = False, dtype: str = "float32",
                 compiled: bool = False) -> None:
        self.name, self.batch, self.threads = name, batch, threads or default_threads
        self.channels_last, self.dtype, self.compiled = channels_last, dtype, compiled
        self.device = device
        self.times: list[float] = []
        self.unet = create_unet(cfg).to(device).eval()
        self.x, self.t, self.y = _inputs(cfg, batch, device)
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        if compiled:
            self.unet = torch.compile(self.unet)
        first = self.call()
        self.compile_seconds = first if compiled else None
        self.call()  # second warm-up

    def call(self) -> float:
        torch.set_num_threads(self.threads)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bfloat16"
                    else torch.autocast(self.device.type, enabled=False))
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            self.unet(self.x, self.t, class_labels=self.y)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


if __name__ == "__main__":
    main()
