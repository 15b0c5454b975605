"""Training images for the generator, held in memory, with batches drawn from (seed, step) alone.

Drawing every batch from a generator keyed by the step (instead of a stateful DataLoader) makes a
resumed run see exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meddiffuse.data.dataset import Dataset
from meddiffuse.data.loader import match_channels
from meddiffuse.generate.config import GeneratorConfig
from meddiffuse.generate.errors import IncompatibleGenerator, InvalidGeneratorRequest
from meddiffuse.generate.seeding import derive_seed


class TrainingImages:
    """The train split as a (N, C, H, W) uint8 tensor at the generator's resolution, plus labels."""

    def __init__(self, dataset: Dataset, config: GeneratorConfig, device: torch.device | str = "cpu") -> None:
        check_dataset(dataset, config)
        images, labels = dataset.load_arrays("train")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = match_channels(x, config.channels)
        if x.shape[-1] != config.resolution:  # downscale with antialiasing; never upscale (blur)
            x = F.interpolate(x, size=(config.resolution, config.resolution), mode="bilinear",
                              antialias=True, align_corners=False)
        self.images = x.round().clamp(0, 255).to(torch.uint8).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.device = torch.device(device)
        self._perm_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, start: int, count: int, seed: int) -> torch.Tensor:
        """Positions ``start..start+count-1`` of an endless stream of seeded epoch permutations."""
        n = len(self)
        out = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, n)
            perm = self._permutation(epoch, seed)
            take = min(n - offset, count - len(out))
            out.extend(perm[offset:offset + take].tolist())
            pos += take
        return torch.tensor(out, dtype=torch.long)

    def _permutation(self, epoch: int, seed: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(
                len(self), generator=torch.Generator().manual_seed(derive_seed("epoch", seed, epoch)))}
        return self._perm_cache[epoch]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1] and their class indices."""
        idx = indices.to(self.device)
        x = self.images[idx].float().div_(127.5).sub_(1.0)
        return x, self.labels[idx]


def check_dataset(dataset: Dataset, config: GeneratorConfig) -> None:
    """Refuse a dataset the config cannot be trained on, with the reason."""
    m = dataset.manifest
    if m.domain != config.domain or list(m.classes) != list(config.classes):
        raise IncompatibleGenerator(
            f"dataset {dataset.prefix!r} is domain {m.domain!r} with classes {m.classes}; the generator config "
            f"is for {config.domain!r} with classes {config.classes}"
        )
    if m.resolution < config.resolution:
        raise IncompatibleGenerator(
            f"dataset {dataset.prefix!r} is {m.resolution} px but the generator is {config.resolution} px; "
            "upscaling would train it on blur: lower the generator resolution or ingest at a higher one"
        )
    if not m.select("train"):
        raise InvalidGeneratorRequest(f"dataset {dataset.prefix!r} has no images in its train split")
