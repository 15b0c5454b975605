"""torch ``Dataset``/``DataLoader`` over a Dataset manifest."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from meddiffuse.data.dataset import Dataset, Entry, Split
from meddiffuse.domains import Domain

Transform = Callable[[torch.Tensor], torch.Tensor]


class ManifestImageDataset(TorchDataset):
    """Images of one split as float tensors in [0, 1], shape (C, H, W), with class indices.

    Images are decoded once into memory: study datasets are small (thousands of 32-128 px images),
    and decoding PNGs every epoch would dominate CPU training time.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: Split | None = None,
        transform: Transform | None = None,
        channels: int | None = None,
        entries: list[Entry] | None = None,
    ) -> None:
        self.dataset = dataset
        self.entries = entries if entries is not None else dataset.manifest.select(split)
        images, labels = dataset.load_arrays(entries=self.entries)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # N C H W uint8
        self.labels = torch.from_numpy(labels)
        self.transform = transform
        self.channels = channels or dataset.manifest.channels
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        x = match_channels(x, self.channels)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=len(self.classes))


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert a (C, H, W) or (N, C, H, W) tensor to ``channels`` (1 <-> 3) without changing content."""
    c_dim = x.dim() - 3
    c = x.shape[c_dim]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:c_dim], 3, *x.shape[c_dim + 1 :])
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * w).sum(dim=c_dim, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def train_augmentation(domain: Domain, strength: float = 1.0) -> Transform:
    """Label-preserving augmentations for the domain (flips only where anatomy allows them)."""
    from torchvision.transforms import v2

    ops: list[torch.nn.Module] = []
    if domain.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if domain.vflip:
        ops.append(v2.RandomVerticalFlip())
    if strength > 0:
        ops.append(
            v2.RandomAffine(degrees=10 * strength, translate=(0.05 * strength, 0.05 * strength),
                            scale=(1 - 0.1 * strength, 1 + 0.1 * strength))
        )
        ops.append(v2.ColorJitter(brightness=0.15 * strength, contrast=0.15 * strength))
    return v2.Compose(ops)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    balanced: bool = False,
) -> DataLoader:
    """A seeded loader; ``balanced`` samples classes equally (with replacement) for skewed datasets."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if balanced:
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise ValueError("balanced sampling needs a dataset with a .labels tensor")
        counts = torch.bincount(labels).clamp(min=1).float()
        weights = (1.0 / counts)[labels]
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), generator=generator)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        generator=generator,
        num_workers=0,  # in-memory tensors: worker processes only add start-up cost on 2 cores
    )
