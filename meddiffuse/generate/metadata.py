"""``generator.json``: the small record written last beside a saved generator (its commit point)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from meddiffuse.domains import Domain, get_domain
from meddiffuse.generate.config import GeneratorConfig
from meddiffuse.generate.errors import IncompatibleGenerator

GENERATOR_JSON = "generator.json"
WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 1


class GeneratorMeta(BaseModel):
    format_version: int = FORMAT_VERSION
    domain: str
    classes: list[str]
    channels: int
    resolution: int
    prediction_type: str
    config: GeneratorConfig
    steps_trained: int
    dataset_id: str | None = None
    dataset_prefix: str | None = None
    seed: int | None = None
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")

    @property
    def weights_id(self) -> str:
        return self.files.get(WEIGHTS_FILE, "")[:16]

    def check_compatible(self, domain: Domain | str, resolution: int | None = None) -> None:
        """Raise IncompatibleGenerator unless this generator makes ``domain`` images at ``resolution``."""
        name = domain if isinstance(domain, str) else domain.name
        if name != self.domain:
            raise IncompatibleGenerator(f"this generator was trained for domain {self.domain!r}, not {name!r}")
        wanted = domain if isinstance(domain, Domain) else _registered(name)
        if wanted is not None and (list(wanted.classes) != self.classes or wanted.channels != self.channels):
            raise IncompatibleGenerator(
                f"this generator's classes {self.classes} ({self.channels} channels) do not match domain "
                f"{name!r}: {wanted.classes} ({wanted.channels} channels)"
            )
        if resolution is not None and resolution != self.resolution:
            raise IncompatibleGenerator(
                f"this generator makes {self.resolution} px images, but {resolution} px were requested"
            )


def _registered(name: str) -> Domain | None:
    try:
        return get_domain(name)
    except KeyError:  # a custom domain known only by name
        return None
