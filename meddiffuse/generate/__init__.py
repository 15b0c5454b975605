"""Class-conditional diffusion generator: config, UNet, training, guided sampling, synthetic datasets.

Kept apart as in diffusers: the model (``model``), the noise schedulers/samplers (``samplers``), the
training loop (``training``), and the sampling pipeline (``pipeline.DiffusionGenerator``).
"""

from meddiffuse.generate.artifact import load_generator, model_prefix, save_generator_model
from meddiffuse.generate.config import (
    PRESETS,
    GeneratorConfig,
    create_generator_config,
    list_presets,
)
from meddiffuse.generate.errors import (
    CheckpointMismatch,
    GeneratorNotFound,
    IncompatibleGenerator,
    InvalidGeneratorRequest,
)
from meddiffuse.generate.grid import sample_grid_png, write_sample_grids
from meddiffuse.generate.metadata import GeneratorMeta
from meddiffuse.generate.model import create_noise_scheduler, create_unet
from meddiffuse.generate.pipeline import DiffusionGenerator
from meddiffuse.generate.samplers import DEFAULT_SAMPLER, SAMPLERS, create_sampler, list_samplers
from meddiffuse.generate.seeding import class_seeds
from meddiffuse.generate.synthesis import (
    GenerationPlan,
    ShardSpec,
    commit_generation,
    generate_dataset,
    plan_generation,
    run_shard,
)
from meddiffuse.generate.training import GeneratorInfo, TrainStep, snapshot_prefix, train_generator

__all__ = [
    "DEFAULT_SAMPLER",
    "PRESETS",
    "SAMPLERS",
    "CheckpointMismatch",
    "DiffusionGenerator",
    "GenerationPlan",
    "GeneratorConfig",
    "GeneratorInfo",
    "GeneratorMeta",
    "GeneratorNotFound",
    "IncompatibleGenerator",
    "InvalidGeneratorRequest",
    "ShardSpec",
    "TrainStep",
    "class_seeds",
    "create_generator_config",
    "create_noise_scheduler",
    "create_sampler",
    "commit_generation",
    "create_unet",
    "generate_dataset",
    "list_presets",
    "list_samplers",
    "load_generator",
    "model_prefix",
    "plan_generation",
    "run_shard",
    "sample_grid_png",
    "save_generator_model",
    "snapshot_prefix",
    "train_generator",
    "write_sample_grids",
]
