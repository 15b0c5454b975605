"""Sampler registry: the diffusers schedulers that turn noise into images, by name.

Every sampler is derived from the *training* scheduler's config, so it inherits the noise schedule
and the prediction type (v or epsilon) the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from meddiffuse.config import CPU_STUDY
from meddiffuse.generate.errors import InvalidGeneratorRequest


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_cls: type[SchedulerMixin]
    overrides: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise each step (needs per-image generators)
    description: str = ""


SAMPLERS: dict[str, SamplerSpec] = {
    "dpmsolver++": SamplerSpec(
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2),
        description="DPM-Solver++ (2M), deterministic; good images in 15-25 steps (default).",
    ),
    "dpmsolver++-sde": SamplerSpec(
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", solver_order=2),
        stochastic=True,
        description="SDE-DPM-Solver++ (2M), stochastic like ancestral DDPM: fresh noise each step corrects "
                    "an imperfect model's drift; 20-30 steps.",
    ),
    "unipc": SamplerSpec(
        UniPCMultistepScheduler,
        description="UniPC multistep predictor-corrector, deterministic; strong at 10-20 steps.",
    ),
    # 'trailing' starts from the last training timestep (pure noise) when steps are few
    "ddim": SamplerSpec(
        DDIMScheduler,
        dict(timestep_spacing="trailing", set_alpha_to_one=True),
        description="DDIM (eta=0), deterministic; needs ~50 steps.",
    ),
    "ddpm": SamplerSpec(
        DDPMScheduler,
        dict(timestep_spacing="trailing"),
        stochastic=True,
        description="Ancestral DDPM, stochastic; needs hundreds of steps.",
    ),
}

DEFAULT_SAMPLER: str = CPU_STUDY["sampler"]  # the study recipe's sampling (bench/science.py)
DEFAULT_GUIDANCE: float = CPU_STUDY["guidance"]


def list_samplers() -> list[str]:
    return list(SAMPLERS)


def get_sampler_spec(name: str) -> SamplerSpec:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise InvalidGeneratorRequest(
            f"unknown sampler {name!r}; choose one of {list_samplers()}"
        ) from None


def create_sampler(name: str, train_scheduler_config: Any) -> SchedulerMixin:
    """A fresh sampler scheduler (multistep samplers keep state: never share one between runs)."""
    spec = get_sampler_spec(name)
    return spec.scheduler_cls.from_config(train_scheduler_config, **spec.overrides)
