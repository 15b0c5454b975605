"""Seeds derived from names and numbers, so every random draw can be recomputed on its own.

Training draws each step's batch, noise and timesteps from a generator keyed by (seed, step, process),
which makes a resumed run repeat exactly what an uninterrupted one would have done. Sampling gives
every image its own seed, so any image can be regenerated without the rest of its batch.
"""

from __future__ import annotations

import hashlib

import torch

SEED_BITS = 63  # fits int64 columns (MLflow/pandas) and torch.manual_seed


def derive_seed(*parts: object) -> int:
    """A well-mixed non-negative 63-bit seed from any printable parts."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def class_seeds(seed: int, class_index: int, count: int, start: int = 0) -> list[int]:
    """Per-image seeds for images ``start..start+count-1`` of one class of a generation run.

    Seeds depend on (seed, class, index) only, so extending a run from N to M images per class keeps
    the first N images and never repeats a seed across classes.
    """
    return [derive_seed("image", seed, class_index, i) for i in range(start, start + count)]


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))
