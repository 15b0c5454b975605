"""Generator configuration: one pydantic model, a registry of presets, and ``create_generator_config``.

A config fully describes a generator run: the UNet's shape, the noise schedule and the training recipe.
It is stored beside every checkpoint and every saved model, so a model can always be rebuilt and a
resumed run can refuse a checkpoint made with a different recipe.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meddiffuse.config import without_added_defaults
from meddiffuse.domains import Domain
from meddiffuse.generate.errors import InvalidGeneratorRequest

PredictionType = Literal["v_prediction", "epsilon"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]


class GeneratorConfig(BaseModel):
    """Everything needed to build and train a class-conditional diffusion UNet for one domain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "custom"
    # what the generator produces
    domain: str
    classes: list[str] = Field(min_length=2)
    channels: int = Field(ge=1, le=3)
    resolution: int = Field(ge=8, le=1024)
    # the UNet
    block_out_channels: tuple[int, ...] = Field(min_length=1)
    attention_levels: tuple[bool, ...] = Field(description="Self-attention in each resolution level.")
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    mid_attention: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # the diffusion process
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: PredictionType = "v_prediction"
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR-γ loss weighting; None = unweighted.")
    label_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of labels replaced by the null class (classifier-free guidance)."
    )
    # optimisation
    batch_size: int = Field(64, ge=1, description="Images per step per process.")
    train_steps: int = Field(
        8000, ge=1, description="Default step budget and LR-schedule horizon when no --steps is given."
    )
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "cosine"
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.995, gt=0, lt=1)
    ema_power: float = Field(0.75, gt=0, description="EMA warm-up exponent (decay ramps up to ema_decay).")
    augment: bool = Field(True, description="Flip images where the domain's anatomy allows it.")
    augment_strength: float = Field(
        0.0, ge=0.0, le=1.0, description="Small affine and intensity changes to half of each batch (0 = flips only)."
    )
    # execution
    mixed_precision: MixedPrecision = Field(
        "auto", description="auto = bf16/fp16 on CUDA, float32 on CPU; bf16 on a CPU is used only where the CPU "
                            "computes bf16 natively (Intel AMX or AVX512-BF16), else float32.")
    compile: bool = Field(False, description="torch.compile the UNet (helps on long runs; slow to start).")

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorConfig:
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but there are {levels} levels"
            )
        if self.resolution % (2 ** (levels - 1)):
            raise ValueError(
                f"resolution {self.resolution} must be divisible by {2 ** (levels - 1)} "
                f"({levels} levels halve it {levels - 1} times)"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block widths {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def null_class(self) -> int:
        """Class-embedding index that means 'no label' (the unconditional branch of guidance)."""
        return len(self.classes)

    def fingerprint(self) -> str:
        """Hash of the fields that change what a checkpoint means (execution flags excluded)."""
        data = without_added_defaults(self.model_dump(mode="json", exclude={"mixed_precision", "compile", "preset"}),
                                      _ADDED_FIELDS)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# field -> default, for fields added after checkpoints were already fingerprinted
_ADDED_FIELDS: dict[str, Any] = {"augment_strength": 0.0}

# Preset shapes; everything else comes from the GeneratorConfig defaults (the recipe in STACK-NOTES).
PRESETS: dict[str, dict[str, Any]] = {
    # tests: a forward/backward pass in milliseconds at 16-32 px
    "tiny": dict(
        resolution=16,
        block_out_channels=(16, 32),
        attention_levels=(False, True),
        attention_head_dim=8,
        norm_num_groups=8,
        batch_size=16,
        train_steps=200,
        warmup_steps=5,
        learning_rate=2e-3,
        ema_decay=0.99,
    ),
    # CPU benchmarks: ~29 images/s training at 32 px on 2 cores (STACK-NOTES)
    "cpu-small": dict(
        resolution=32,
        block_out_channels=(32, 64, 128),
        attention_levels=(False, False, True),
        attention_head_dim=32,
        norm_num_groups=16,
        batch_size=64,
        train_steps=2000,  # ~75 min on 2 CPU cores; --minutes stops earlier
        warmup_steps=50,  # a 10-minute CPU run is only ~250 steps
    ),
    # study scale on one GPU: 128 px, attention at 16 and 8 px
    "gpu-base": dict(
        resolution=128,
        block_out_channels=(64, 128, 256, 256, 512),
        attention_levels=(False, False, False, True, True),
        layers_per_block=2,
        attention_head_dim=64,
        norm_num_groups=32,
        batch_size=64,
        train_steps=60_000,
        warmup_steps=1000,
        learning_rate=2e-4,
        ema_decay=0.9995,
        dropout=0.1,
    ),
}


# the study's CPU generator (bench/science.py): cpu-small's UNet with a constant LR after warm-up, so the EMA
# model at any step is what a run of that budget gives, and a finished run can be extended by resuming it; bf16
# autocast where the CPU computes bf16 natively (AMX: 1.75x the steps in the same minutes; AVX512-BF16 alone,
# AMD Zen 4: 1.6x; float32 elsewhere)
PRESETS["cpu-study"] = {**PRESETS["cpu-small"], "lr_schedule": "constant_with_warmup", "mixed_precision": "bf16"}


def list_presets() -> list[str]:
    return list(PRESETS)


def create_generator_config(
    preset: str, domain: Domain, resolution: int | None = None, **overrides: Any
) -> GeneratorConfig:
    """The ``preset`` config for ``domain`` (classes, channels), at ``resolution`` if given, with overrides."""
    if preset not in PRESETS:
        raise InvalidGeneratorRequest(f"unknown generator preset {preset!r}; choose one of {list_presets()}")
    fields: dict[str, Any] = dict(PRESETS[preset])
    if resolution is not None:
        fields["resolution"] = resolution
    fields.update(overrides)
    fields.update(preset=preset, domain=domain.name, classes=list(domain.classes), channels=domain.channels)
    try:
        return GeneratorConfig(**fields)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidGeneratorRequest(f"invalid generator config for preset {preset!r}: {exc}") from exc
