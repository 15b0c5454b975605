"""Guided, per-image-seeded sampling from a trained class-conditional UNet.

Reproducibility: each image's initial noise (and any per-step noise of a stochastic sampler) comes from
its own CPU ``torch.Generator``; and the UNet always runs on full batches of ``batch_size`` images
(the last batch is padded), because CPU/GPU kernels are chosen by tensor shape and round differently
for different batch sizes. So an image depends only on (label, seed, sampler, steps, guidance,
batch_size) and the device, never on which other images shared its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from meddiffuse.domains import Domain, get_domain
from meddiffuse.generate.errors import InvalidGeneratorRequest
from meddiffuse.generate.metadata import GeneratorMeta
from meddiffuse.generate.samplers import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, create_sampler, get_sampler_spec
from meddiffuse.generate.seeding import SEED_BITS, class_seeds, torch_generator

BatchCallback = Callable[[int, int], None]  # (images done, images total)
OutputType = Literal["uint8", "float"]


class DiffusionGenerator:
    """A trained generator ready to sample: the (EMA) UNet, its noise-schedule config and metadata."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler_config: Any,
        meta: GeneratorMeta,
        ref: str = "",
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.scheduler_config = scheduler_config
        self.meta = meta
        self.ref = ref
        self.pinned: Any = None  # the registry PinnedVersion it was loaded from, if any

    # -- what it generates -------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    @property
    def resolution(self) -> int:
        return self.meta.resolution

    @property
    def channels(self) -> int:
        return self.meta.channels

    @property
    def id(self) -> str:
        """Content id: the hash of the UNet weights file."""
        return self.meta.weights_id

    @property
    def domain(self) -> Domain:
        """The registered domain if it still matches, else one rebuilt from the metadata."""
        try:
            domain = get_domain(self.meta.domain)
            if domain.classes == self.classes and domain.channels == self.channels:
                return domain
        except KeyError:
            pass
        return Domain(name=self.meta.domain, classes=self.classes, channels=self.channels)

    def class_index(self, name: str) -> int:
        """Index of a class by canonical name or alias; unknown names raise UnknownClassError."""
        return self.domain.class_index(name)

    def check_compatible(self, domain: Domain | str, resolution: int | None = None) -> None:
        """Raise IncompatibleGenerator unless this generator produces ``domain`` images at ``resolution``."""
        self.meta.check_compatible(domain, resolution)

    # -- sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        labels: Sequence[int],
        seeds: Sequence[int],
        *,
        sampler: str = DEFAULT_SAMPLER,
        steps: int = 20,
        guidance: float = DEFAULT_GUIDANCE,
        batch_size: int = 64,
        progress: bool = False,
        on_batch: BatchCallback | None = None,
        output_type: OutputType = "uint8",
    ) -> np.ndarray:
        """Images (N, H, W, C) for class indices ``labels`` with one seed per image.

        ``guidance`` w follows Ho & Salimans: prediction = cond + w * (cond - uncond); w = 0 is plain
        conditional sampling (and skips the unconditional pass). ``output_type`` "uint8" gives
        0..255 pixels, "float" the unquantised float32 values in [0, 1].
        """
        labels, seeds = list(labels), list(seeds)
        self._check_request(labels, seeds, sampler, steps, guidance, batch_size)
        if output_type not in ("uint8", "float"):
            raise InvalidGeneratorRequest(f"output_type must be 'uint8' or 'float', got {output_type!r}")
        dtype = np.uint8 if output_type == "uint8" else np.float32
        out = np.empty((len(labels), self.resolution, self.resolution, self.channels), dtype=dtype)
        bar = tqdm(total=len(labels), desc=f"sampling ({sampler}, {steps} steps)", unit="img",
                   disable=not progress, leave=False)
        with bar:
            for start in range(0, len(labels), batch_size):
                stop = min(start + batch_size, len(labels))
                x = self._sample_batch(labels[start:stop], seeds[start:stop], sampler, steps, guidance, batch_size)
                out[start:stop] = to_uint8(x) if output_type == "uint8" else ((x + 1) / 2).numpy()
                bar.update(stop - start)
                if on_batch is not None:
                    on_batch(stop, len(labels))
        return out

    def sample_class(self, label: str | int, n: int, seed: int, **kwargs: Any) -> np.ndarray:
        """``n`` images of one class with the same per-image seeds a generated dataset would use."""
        index = label if isinstance(label, int) else self.class_index(label)
        if n <= 0:
            raise InvalidGeneratorRequest(f"number of images must be positive, got {n}")
        return self.sample([index] * n, class_seeds(seed, index, n), **kwargs)

    def _check_request(
        self, labels: list[int], seeds: list[int], sampler: str, steps: int, guidance: float, batch_size: int
    ) -> None:
        get_sampler_spec(sampler)
        if len(labels) != len(seeds):
            raise InvalidGeneratorRequest(f"{len(labels)} labels but {len(seeds)} seeds: give one seed per image")
        if not labels:
            raise InvalidGeneratorRequest("nothing to sample: labels is empty")
        bad = sorted({int(y) for y in labels if not 0 <= int(y) < self.num_classes})
        if bad:
            raise InvalidGeneratorRequest(
                f"class indices {bad} out of range: this generator has {self.num_classes} classes {self.classes}"
            )
        bad_seeds = [s for s in seeds if not 0 <= int(s) < 2**SEED_BITS]
        if bad_seeds:
            raise InvalidGeneratorRequest(f"seeds must be in [0, 2**{SEED_BITS}), got {bad_seeds[:3]}")
        if steps <= 0:
            raise InvalidGeneratorRequest(f"sampling steps must be positive, got {steps}")
        if steps > self.scheduler_config["num_train_timesteps"]:
            raise InvalidGeneratorRequest(
                f"steps={steps} exceeds the {self.scheduler_config['num_train_timesteps']} training timesteps"
            )
        if not guidance >= 0:  # also refuses NaN
            raise InvalidGeneratorRequest(f"guidance must be >= 0, got {guidance}")
        if batch_size <= 0:
            raise InvalidGeneratorRequest(f"batch_size must be positive, got {batch_size}")

    @torch.inference_mode()
    def _sample_batch(
        self, labels: list[int], seeds: list[int], sampler: str, steps: int, guidance: float, width: int
    ) -> torch.Tensor:
        """(n, H, W, C) float images in [-1, 1] on the CPU."""
        n = len(labels)
        shape = (1, self.channels, self.resolution, self.resolution)
        generators = [torch_generator(s) for s in seeds]
        # padding rows keep every UNet call the same shape; they cost compute, not correctness
        padding = width - n
        generators += [torch_generator(0) for _ in range(padding)]
        x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        y = torch.tensor(labels + [0] * padding, device=self.device)
        null = torch.full_like(y, len(self.meta.classes))
        scheduler = create_sampler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)  # before every run: multistep state
        x = x * scheduler.init_noise_sigma
        guided = guidance > 0
        step_kwargs: dict[str, Any] = {}
        if get_sampler_spec(sampler).stochastic:
            step_kwargs["generator"] = generators
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if guided:  # conditional and unconditional halves in one batch
                pred = self.unet(torch.cat([model_in, model_in]), t, class_labels=torch.cat([y, null])).sample
                cond, uncond = pred.chunk(2)
                pred = cond + guidance * (cond - uncond)
            else:
                pred = self.unet(model_in, t, class_labels=y).sample
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        return x[:n].float().clamp(-1, 1).permute(0, 2, 3, 1).cpu()

    def __repr__(self) -> str:
        return (f"DiffusionGenerator({self.ref or '<memory>'!r}, domain={self.meta.domain}, "
                f"{self.resolution}px, steps_trained={self.meta.steps_trained})")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats to 0..255 pixels."""
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy()
