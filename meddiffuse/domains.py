"""Domain registry: which classes a domain has, in which channels, and how its folders are spelled.

``get_domain("brain-mri")`` returns a built-in domain; ``domain_from_folder(path)`` makes a custom one
from any ImageFolder (classes = sub-folder names). Public datasets ship with their own folder
spellings (``glioma_tumor``, ``Benign``, ``non-COVID``...); aliases map them onto canonical names.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, Field, field_validator


class UnknownClassError(ValueError):
    """A folder or request names a class the domain does not have."""


class UnknownDomainError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown domain"


def _norm(name: str) -> str:
    """Case- and punctuation-insensitive form used for alias matching."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


class Domain(BaseModel):
    """A kind of medical image with a fixed, ordered set of classes."""

    name: str
    title: str = ""
    classes: list[str] = Field(min_length=2)
    channels: int = Field(ge=1, le=3)
    aliases: dict[str, str] = Field(default_factory=dict, description="folder spelling -> class")
    hflip: bool = Field(True, description="Horizontal flips keep the label valid (augmentation).")
    vflip: bool = Field(False, description="Vertical flips keep the label valid (augmentation).")

    @field_validator("channels")
    @classmethod
    def _one_or_three(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError("channels must be 1 (grayscale) or 3 (RGB)")
        return v

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mode(self) -> str:
        """PIL mode of the domain's images."""
        return "L" if self.channels == 1 else "RGB"

    def class_index(self, name: str) -> int:
        return self.classes.index(self.canonical_class(name))

    def canonical_class(self, name: str) -> str:
        """Map a folder name or alias onto the canonical class name, or raise UnknownClassError."""
        if name in self.classes:
            return name
        key = _norm(name)
        for cls in self.classes:
            if _norm(cls) == key:
                return cls
        for alias, cls in self.aliases.items():
            if _norm(alias) == key:
                return cls
        raise UnknownClassError(
            f"{name!r} is not a class of domain {self.name!r}; expected one of {self.classes}"
            + (f" or an alias {sorted(self.aliases)}" if self.aliases else "")
        )


BRAIN_MRI = Domain(
    name="brain-mri",
    title="Brain tumour MRI",
    classes=["glioma", "meningioma", "notumor", "pituitary"],
    channels=1,
    aliases={
        "glioma_tumor": "glioma",
        "meningioma_tumor": "meningioma",
        "no_tumor": "notumor",
        "no tumour": "notumor",
        "no": "notumor",
        "pituitary_tumor": "pituitary",
    },
    hflip=True,  # axial slices are close to left-right symmetric
)

ALL_SMEARS = Domain(
    name="all",
    title="Acute lymphoblastic leukaemia blood smears",
    classes=["benign", "early-pre-b", "pre-b", "pro-b"],
    channels=3,
    aliases={
        "Benign": "benign",
        "Early": "early-pre-b",
        "Malignant_early Pre-B": "early-pre-b",
        "[Malignant] early Pre-B": "early-pre-b",
        "Pre": "pre-b",
        "Malignant_Pre-B": "pre-b",
        "[Malignant] Pre-B": "pre-b",
        "Pro": "pro-b",
        "Malignant_Pro-B": "pro-b",
        "[Malignant] Pro-B": "pro-b",
        "hem": "benign",
    },
    hflip=True,
    vflip=True,  # a smear has no up or down
)

COVID_CT = Domain(
    name="covid-ct",
    title="SARS-CoV-2 CT",
    classes=["covid", "non-covid"],
    channels=1,
    aliases={"COVID": "covid", "non-COVID": "non-covid", "noncovid": "non-covid", "normal": "non-covid"},
    hflip=True,
)

_REGISTRY: dict[str, Domain] = {d.name: d for d in (BRAIN_MRI, ALL_SMEARS, COVID_CT)}


def list_domains() -> list[str]:
    return sorted(_REGISTRY)


def get_domain(name: str) -> Domain:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownDomainError(
            f"unknown domain {name!r}; built-in domains are {list_domains()} "
            "(or use domain_from_folder for any ImageFolder)"
        ) from None


def domain_from_folder(path: str | Path, name: str | None = None, channels: int = 3) -> Domain:
    """A custom domain whose classes are the sub-folder names of an ImageFolder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} must hold at least two class sub-folders, found {classes}")
    return Domain(name=name or root.name, title=f"custom ({root})", classes=classes, channels=channels)
