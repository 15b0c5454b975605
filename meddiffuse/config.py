"""One configuration model for every door: CLI, flows and services.

Values come from (highest first) explicit arguments, ``MEDDIFFUSE_*`` environment variables
(nested sections use ``__``, e.g. ``MEDDIFFUSE_GENERATOR__PRESET=tiny``), a ``.env`` file, then the
embedded defaults below, which keep everything under ``./.meddiffuse/`` so one machine needs no servers.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# One value per concept: ingest, experiment, flows and services agree unless told otherwise.
DEFAULT_RESOLUTION = 32
DEFAULT_TRAIN_FRACTION = 0.2
DEFAULT_SEED = 0


class IngestConfig(BaseModel):
    """How raw image folders become a real Dataset."""

    resolution: int = Field(DEFAULT_RESOLUTION, ge=8, le=1024, description="Square side in pixels after centre crop.")
    train_fraction: float = Field(DEFAULT_TRAIN_FRACTION, gt=0.0, lt=1.0, description="Share of each class in `train`.")
    seed: int = DEFAULT_SEED
    max_pixels: int = Field(
        50_000_000, description="Images above this many pixels are refused before decoding."
    )


class S3Config(BaseModel):
    """MinIO/S3 connection; credentials only ever come from the environment or a secret."""

    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    session_token: SecretStr = SecretStr("")
    region: str | None = None
    secure: bool = False
    retries: int = Field(4, ge=0, description="Retries after the first attempt on transient errors.")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles on each retry.")
    timeout_s: float = Field(30.0, gt=0, description="Connect and read timeout of one request.")
    part_size: int = Field(
        16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        description="Objects larger than this are uploaded in parts of this size (S3 limits: 5 MiB-5 GiB).",
    )
    verify_tls: bool = Field(True, description="Check the server certificate when `secure` is on.")


# Named study recipes (`meddiffuse experiment --recipe NAME`): a recipe is a set of ExperimentConfig values.
# `cpu-study` is the default (the fields below take their defaults from it); bench/science.py measured it
# (README, "Closing the TSTR gap"). `gpu-study` is the same protocol at GPU scale, not yet run on a GPU.
CPU_STUDY: dict[str, Any] = {
    "generator_preset": "cpu-study",  # cpu-small's UNet, constant LR after warm-up + EMA: any budget, resumable
    # 2700 steps under bf16 autocast: ~25 (brain MRI, 1 channel) to ~28 (ALL, RGB) min on 2 cores of a Xeon with
    # AMX; 3000 steps gave TSTR/TRTR 0.84 -> 0.88 and coverage 0.56 -> 0.79 on brain MRI over 1200 steps, but take
    # 31 min on ALL; ALL 0.88 -> 0.96 at 2700. COVID CT does better near 1200-1400 steps (~1.0 in three runs,
    # 0.84 at 2700): its own budget is below. The cap keeps the 30-minute budget on slower CPUs: bf16
    # with AVX512-BF16 alone (a Zen 4 EPYC: 0.75 s/step, stopped at 2311) or float32 without native bf16
    # (~1.05 s/step on an older EPYC, 1.19 on an Ice Lake Xeon: 1393-1474 steps); the run records where it stopped
    "generator_steps": 2700,
    # ... except where a domain does better on another: COVID CT's TSTR/TRTR peaks near 1200 steps (w = 2: 1.01
    # against 0.84 at 2700 on the AMX Xeon, 0.98 against 0.92 at 2196 on a Zen 4; w = 1 at 2196 also 0.92), and
    # it takes ~16 of the 30 minutes; brain MRI keeps gaining to 3000 (w = 1: 0.915 at 3000 on the AMX Xeon,
    # 0.86 at 2311 on a Zen 4), which its 1-channel images train in 26 min on AMX (0.52 s/step; slower CPUs stop
    # at the cap). A given step budget (any door's --generator-steps) is every domain's
    "domain_generator_steps": {"brain-mri": 3000, "covid-ct": 1200},
    "generator_minutes": 29.0,
    "sampler": "dpmsolver++-sde",  # +3 points TSTR over the ODE solver on brain MRI at the same cost
    # w = 1 since 2026-12-07 (was 2; bench/science.py --plan guidance / combined, one bf16 run per row pair): more
    # varied samples for a little class fidelity. TSTR/TRTR on ALL 0.97 against 0.94 (intervals apart; mixed
    # 1.002), brain MRI 0.915 against 0.88 (3000 steps) and 0.86 against 0.85 (2311), COVID CT 0.92 both
    "guidance": 1.0,
    "synthetic_per_class": 512,  # +6.6 (brain MRI) / +2.1 (ALL) points TSTR over 128 from the same generator
    # the classifier keeps its last epoch, averaged (bench/science.py --plan training): a val split drawn from
    # synthetic images picks epochs that do worse on real ones; TSTR +0.3 / +3.9 / +1.2 points on brain MRI /
    # ALL / COVID CT, and TRTR trains on every real image instead of 90%
    "epochs": 6,
    "val_fraction": 0.0,
    "ema_decay": 0.998,
}
# for help texts, so they follow the recipe: "brain-mri 3000, covid-ct 1200"
DOMAIN_BUDGETS_TEXT = ", ".join(f"{domain} {steps}" for domain, steps in CPU_STUDY["domain_generator_steps"].items())
RECIPES: dict[str, dict[str, Any]] = {
    "cpu-study": CPU_STUDY,
    "gpu-study": {**CPU_STUDY, "generator_preset": "gpu-base", "generator_steps": 20_000, "generator_minutes": None,
                  "domain_generator_steps": {}, "resolution": 64},
}


def recipe_values(name: str) -> dict[str, Any]:
    """The ExperimentConfig values of recipe ``name`` (ValueError naming the known recipes)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return dict(RECIPES[name])


def given_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (fields a user set) with what setting them implies: a ``synthetic_multiple`` asked for without a
    ``synthetic_per_class`` means the multiple, not the recipe's fixed number per class; a ``generator_steps``
    (None included: minutes alone) without a ``domain_generator_steps`` is the budget of every domain, not only
    of those the recipe has none for. Doors that merge flags into dumped defaults apply it to the flags first."""
    implied: dict[str, Any] = {}
    if "synthetic_multiple" in given and "synthetic_per_class" not in given:
        implied["synthetic_per_class"] = None
    if "generator_steps" in given and "domain_generator_steps" not in given:
        implied["domain_generator_steps"] = {}
    return {**given, **implied} if implied else given


def without_added_defaults(data: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``data`` less the fields in ``added`` (field -> the value it implicitly had before it existed) that
    still hold that value: a fingerprint taken over ``data`` then matches records made before the field."""
    return {k: v for k, v in data.items() if k not in added or v != added[k]}


class Seeded(BaseModel):
    seed: int = Field(DEFAULT_SEED, ge=0)


class GeneratorRecipe(Seeded):
    """How a generator is trained: preset and budget. Steps make a run reproducible on any machine;
    minutes are only an optional cap (a busy machine then trains fewer steps)."""

    generator_preset: str = CPU_STUDY["generator_preset"]
    generator_steps: int | None = Field(CPU_STUDY["generator_steps"], ge=1, description="Training steps (the budget).")
    generator_minutes: float | None = Field(CPU_STUDY["generator_minutes"], gt=0,
                                            description="Wall-clock cap on one training session (None: none).")
    checkpoint_every: int = Field(200, ge=1)


class SamplingRecipe(Seeded):
    """How images are drawn from a generator (the one source of the sampling defaults)."""

    sampler: str = CPU_STUDY["sampler"]
    sampling_steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(CPU_STUDY["guidance"], ge=0, le=20)


class ClassifierRecipe(Seeded):
    """How a classifier is trained and scored."""

    weights: str = Field("auto", description="auto | none | a local weights file (applies to every arch).")
    input_size: int | None = Field(None, description="Classifier input size; None = per-architecture default.")
    epochs: int = Field(CPU_STUDY["epochs"], ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    balanced: bool = False
    val_fraction: float = Field(CPU_STUDY["val_fraction"], ge=0, lt=1, description="Share of the training "
                                "images held out to pick the best epoch; 0 = train on all and keep the last epoch.")
    early_stopping_patience: int | None = Field(4, ge=1)
    ema_decay: float | None = Field(CPU_STUDY["ema_decay"], gt=0, lt=1, description="Keep an exponential "
                                    "moving average of the weights and use it (e.g. 0.998); None = the raw weights.")
    augmentation_strength: float = Field(1.0, ge=0, le=3, description="Affine/intensity augmentation (0 = flips only).")
    mixup: float = Field(0.0, ge=0, description="timm Mixup alpha (0 = off).")
    cutmix: float = Field(0.0, ge=0, description="timm CutMix alpha (0 = off).")
    bootstrap: int = Field(1000, ge=0)


class ClassifierSpec(ClassifierRecipe):
    """One classifier to train, evaluate on a real test split and register (`train_and_register_classifier`)."""

    domain: str
    arch: str = "efficientnet_lite0"
    train: list[str] = Field(min_length=1, description="Store prefixes of the training Datasets (train split).")
    test: str = Field(description="Store prefix of the real Dataset whose `test` split scores the model.")
    prefix: str | None = Field(None, description="Store prefix for the saved model; default from the spec's hash.")
    alias: str | None = Field(None, description="Alias to point at the new version (e.g. challenger).")
    register_model: bool = True


class GeneratorSpec(GeneratorRecipe):
    """One generator to train on a real Dataset's train split and register (`train_and_register_generator`)."""

    domain: str
    dataset: str = Field(description="Store prefix of the real Dataset.")
    resolution: int | None = Field(None, ge=8, le=512, description="None = the dataset's resolution.")
    prefix: str | None = Field(None, description="Store prefix of the run; default from the spec's hash.")
    alias: str | None = None
    register_model: bool = True

    @model_validator(mode="before")
    @classmethod
    def _the_recipes_budget_for_its_domain(cls, data: Any) -> Any:
        # one domain per spec, so the recipe's own budget for it is final here when none is given
        budgets = CPU_STUDY["domain_generator_steps"]
        if isinstance(data, dict) and "generator_steps" not in data and data.get("domain") in budgets:
            return {**data, "generator_steps": budgets[data["domain"]]}
        return data


class SynthesisSpec(SamplingRecipe):
    """A synthetic Dataset to sample from a generator, in resumable shards."""

    generator: str = Field(description="Registry ref (name@alias, name/version) or store prefix of a generator.")
    per_class: int = Field(ge=1)
    prefix: str = Field(description="Store prefix of the synthetic Dataset.")
    classes: list[str] | None = None
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1, le=1024)


class ExperimentConfig(GeneratorRecipe, SamplingRecipe, ClassifierRecipe):
    """The study's protocol for one domain; every field is a CLI flag, a flow parameter and a service field."""

    domain: str = "brain-mri"
    # over generator_steps for the domains the recipe gives their own (only the study's config carries it: a
    # generator spec is for one domain and gets the resolved budget, `generator_step_budget`)
    domain_generator_steps: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: dict(CPU_STUDY["domain_generator_steps"]),
        description=f"Step budget per domain where the recipe has its own ({DOMAIN_BUDGETS_TEXT}); a "
                    "given generator_steps clears it.")
    data: Path | None = Field(None, description="Raw ImageFolder; None = a phantom folder made on the fly.")
    test_data: Path | None = Field(None, description="Separate real test folder (deduplicated against train).")
    name: str | None = Field(None, description="Experiment name; default = the domain.")
    phantoms_per_class: int = Field(120, ge=4, description="Phantom images per class when data is None.")
    resolution: int = Field(DEFAULT_RESOLUTION, ge=8, le=512,
                            description="Resolution of the datasets and the generator.")
    train_fraction: float = Field(DEFAULT_TRAIN_FRACTION, gt=0.0, lt=1.0)
    # synthetic set: a fixed number per class (the recipe's), or K x the real training set when that is None
    synthetic_per_class: int | None = Field(CPU_STUDY["synthetic_per_class"], ge=1,
                                            description="Synthetic images per class; None = synthetic_multiple.")
    synthetic_multiple: float = Field(1.0, gt=0, description="Synthetic set = K x the real training set "
                                      "(when synthetic_per_class is None).")
    filter_synthetic: bool = Field(False, description="Keep samples a real-train classifier agrees with.")
    filter_min_confidence: float = Field(0.5, ge=0, le=1)
    # classifiers
    archs: list[str] = Field(default_factory=lambda: ["efficientnet_lite0"])
    train_data: list[str] = Field(default_factory=lambda: ["real", "synthetic", "mixed"])
    # explanations and audit
    explain_per_model: int = Field(4, ge=0, description="LIME explanations per classifier (right and wrong).")
    lime_samples: int = Field(1000, ge=10)
    audit: bool = True
    audit_gate: float = Field(0.01, ge=0, le=1, description="Allowed excess share of likely copies.")
    register_models: bool = Field(True, description="Register the generator and every classifier in MLflow.")
    promote: bool = Field(True, description="Move `champion` to a new classifier only when it beats the champion.")

    @model_validator(mode="before")
    @classmethod
    def _what_given_fields_imply(cls, data: Any) -> Any:
        return given_overrides(data) if isinstance(data, dict) else data

    @property
    def experiment_name(self) -> str:
        return self.name or self.domain

    @property
    def generator_step_budget(self) -> int | None:
        """The generator's step budget for this domain: the recipe's own for it, else ``generator_steps``.
        Resolved when read, so a config re-validated for another domain (a multi-domain flow) gets that
        domain's budget."""
        return self.domain_generator_steps.get(self.domain, self.generator_steps)


class ServeConfig(BaseModel):
    """The BentoML services: auth, limits, model reloading."""

    api_key: SecretStr = Field(SecretStr(""), description="Required in the X-API-Key header; '' = no auth.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_concurrency: int = Field(32, ge=1, description="Requests in flight per service; more get 429.")
    threads: int = Field(4, ge=1, description="Threads for sync APIs (BentoML's default is 1).")
    workers: int = Field(1, ge=1, description="Worker processes per service.")
    reload_interval_s: float = Field(10.0, gt=0, le=10.0, description="How often a service re-resolves @champion.")
    max_images_per_request: int = Field(16, ge=1, description="Largest n that /generate answers inline.")
    max_images_per_task: int = Field(4096, ge=1, description="Largest n that /generate accepts as a task.")
    predict_batch: int = Field(16, ge=1, description="Adaptive batching: rows per /predict batch.")
    lime_samples: int = Field(1000, ge=10, le=10000)
    webhook_secret: SecretStr = Field(SecretStr(""), description="MLflow webhook HMAC secret; '' = no webhook.")
    domains: list[str] = Field(default_factory=lambda: ["brain-mri", "all", "covid-ct"],
                               description="Domains whose champions a service serves (those registered).")


class FlowConfig(BaseModel):
    """Prefect flows: where their heavy steps run."""

    backend: Literal["inprocess", "http"] = "inprocess"
    generator_url: str = "http://127.0.0.1:3001"
    trainer_url: str = "http://127.0.0.1:3002"
    shard_size: int = Field(64, ge=1)
    task_retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(2.0, ge=0)
    poll_interval_s: float = Field(2.0, gt=0)


class Settings(BaseSettings):
    """Root settings. ``Settings()`` reads the environment; pass keyword arguments to override."""

    model_config = SettingsConfigDict(
        env_prefix="MEDDIFFUSE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    home: Path = Field(Path(".meddiffuse"), description="Root of the embedded defaults.")
    store: str = Field(
        "", description="'' = <home>/store folder; a folder path; or s3://bucket/prefix."
    )
    tracking_uri: str = Field("", description="MLflow tracking URI; '' = SQLite under <home>.")
    registry_uri: str = Field("", description="MLflow registry URI; '' = same as tracking.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    weights_dir: Path | None = Field(
        None, description="Folder searched for local pretrained classifier weights."
    )
    ingest: IngestConfig = IngestConfig()
    experiment: ExperimentConfig = ExperimentConfig()
    s3: S3Config = S3Config()
    serve: ServeConfig = ServeConfig()
    flows: FlowConfig = FlowConfig()

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser()

    @cached_property
    def store_uri(self) -> str:
        return self.store or str(self.home / "store")

    @cached_property
    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @cached_property
    def artifact_location(self) -> str:
        return (self.home / "mlartifacts").resolve().as_uri()

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # local: config must stay importable without torch

        return "cuda" if torch.cuda.is_available() else "cpu"

