"""The class-conditional UNet and the training noise scheduler, both built from a GeneratorConfig."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

from meddiffuse.generate.config import GeneratorConfig


def create_unet(config: GeneratorConfig) -> UNet2DModel:
    """A ``UNet2DModel`` with one class embedding per class plus a null class for guidance."""
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in config.attention_levels)
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(config.attention_levels))
    return UNet2DModel(
        sample_size=config.resolution,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        add_attention=config.mid_attention,
        dropout=config.dropout,
        num_class_embeds=config.num_classes + 1,
    )


def create_noise_scheduler(config: GeneratorConfig) -> DDPMScheduler:
    """The forward (noising) process used in training; samplers are derived from its config."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,  # samples live in [-1, 1] but clipping x0 mid-trajectory biases v-prediction
    )


def count_parameters(model: UNet2DModel) -> int:
    return sum(p.numel() for p in model.parameters())
