"""Saving and loading a trained generator: a diffusers pipeline folder plus ``generator.json`` last.

Layout under ``<prefix>/model/`` (a standard ``DDPMPipeline`` folder, so diffusers tools can open it)::

    model_index.json  unet/config.json  unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json  generator.json   <- written last: the commit point

``load_generator`` accepts a store prefix, a local folder with the same files (what an MLflow pyfunc
artifact holds), or a ``models:/name/version`` URI resolved through the MLflow registry.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load as load_safetensors

from meddiffuse.config import Settings
from meddiffuse.generate.errors import GeneratorNotFound
from meddiffuse.generate.metadata import GENERATOR_JSON, WEIGHTS_FILE, GeneratorMeta
from meddiffuse.generate.pipeline import DiffusionGenerator
from meddiffuse.store.base import CorruptObject, ObjectStore, sha256_hex

MODEL_DIR = "model"

ReadFile = Callable[[str], bytes]


def model_prefix(prefix: str) -> str:
    """Store prefix of the saved model of the generator run at ``prefix``."""
    return f"{prefix.rstrip('/')}/{MODEL_DIR}"


def save_generator_model(
    unet: UNet2DModel, scheduler: DDPMScheduler, meta: GeneratorMeta, store: ObjectStore, prefix: str
) -> GeneratorMeta:
    """Upload the pipeline folder under ``<prefix>/model/``, then ``generator.json`` (with file hashes)."""
    target = model_prefix(prefix)
    store.delete(f"{target}/{GENERATOR_JSON}")  # withdraw any previous model before replacing files
    with tempfile.TemporaryDirectory(prefix="meddiffuse-model-") as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        files = store.put_folder(Path(tmp), target)
    meta = meta.model_copy(update={"files": files})
    store.put_text(f"{target}/{GENERATOR_JSON}", meta.model_dump_json(indent=2))
    return meta


def write_generator_folder(generator_ref: str, store: ObjectStore, out_dir: str | Path) -> Path:
    """Copy a saved generator's files (checked against their hashes) into a local folder."""
    read, _where = _resolve(generator_ref, store)
    meta = GeneratorMeta.model_validate_json(read(GENERATOR_JSON))
    out = Path(out_dir)
    for rel, digest in meta.files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_checked(read, rel, digest))
    (out / GENERATOR_JSON).write_text(meta.model_dump_json(indent=2))
    return out


def read_generator_meta(ref: str, store: ObjectStore | None) -> GeneratorMeta:
    """A saved generator's ``generator.json`` (store prefix or folder) without loading its weights."""
    read, _where = _resolve(ref, store)
    return GeneratorMeta.model_validate_json(read(GENERATOR_JSON))


def load_generator(
    ref: str,
    store: ObjectStore | None = None,
    settings: Settings | None = None,
    device: str | None = None,
) -> DiffusionGenerator:
    """Load a committed generator from a store prefix, a local folder or a ``models:/`` registry URI."""
    device = device or (settings or Settings()).torch_device()
    from meddiffuse.registry import is_registry_ref

    if is_registry_ref(ref) or ref.startswith("runs:/"):
        return _load_from_mlflow(ref, settings, device)
    read, where = _resolve(ref, store)
    meta = GeneratorMeta.model_validate_json(read(GENERATOR_JSON))
    unet_config = json.loads(_checked(read, "unet/config.json", meta.files.get("unet/config.json")))
    unet = UNet2DModel.from_config(unet_config)
    state = load_safetensors(_checked(read, WEIGHTS_FILE, meta.files.get(WEIGHTS_FILE)))
    unet.load_state_dict(state, strict=True)
    sched = json.loads(_checked(read, "scheduler/scheduler_config.json",
                                meta.files.get("scheduler/scheduler_config.json")))
    scheduler = DDPMScheduler.from_config(sched)
    return DiffusionGenerator(unet, scheduler.config, meta, ref=where, device=device)


def _checked(read: ReadFile, rel: str, digest: str | None) -> bytes:
    data = read(rel)
    if digest is not None and sha256_hex(data) != digest:
        raise CorruptObject(f"generator file {rel!r} does not match the hash in {GENERATOR_JSON}")
    return data


def _resolve(ref: str, store: ObjectStore | None) -> tuple[ReadFile, str]:
    """A reader of the model's files and a printable location, for a store prefix or a local folder."""
    if ref.startswith("file://"):
        return _folder_reader(Path(ref[len("file://"):]), ref)
    if store is not None:
        for prefix in (model_prefix(ref), ref.rstrip("/")):
            if store.exists(f"{prefix}/{GENERATOR_JSON}"):
                return (lambda rel, p=prefix: store.get(f"{p}/{rel}")), ref.rstrip("/")
    if Path(ref).expanduser().is_dir():
        return _folder_reader(Path(ref).expanduser(), ref)
    where = f" in store {store.uri}" if store is not None else ""
    raise GeneratorNotFound(
        f"no generator at {ref!r}{where}: expected {ref}/{MODEL_DIR}/{GENERATOR_JSON} (written when training "
        "finishes; an interrupted run has only checkpoints — re-run train-generator with --resume)"
    )


def _folder_reader(root: Path, ref: str) -> tuple[ReadFile, str]:
    # an MLflow artifact nests the folder one or two levels down (artifacts/generator/)
    nested = sorted(p.parent for pattern in ("*/", "*/*/") for p in root.glob(pattern + GENERATOR_JSON))
    for folder in (root / MODEL_DIR, root, *nested):
        if (folder / GENERATOR_JSON).is_file():
            return (lambda rel, f=folder: (f / rel).read_bytes()), str(folder)
    raise GeneratorNotFound(f"no {GENERATOR_JSON} under folder {root} (ref {ref!r})")


def _load_from_mlflow(ref: str, settings: Settings | None, device: str) -> DiffusionGenerator:
    import mlflow

    from meddiffuse.registry import configure_mlflow, is_registry_ref, resolve

    pinned = resolve(ref, settings) if is_registry_ref(ref) else None  # lineage names a version, never an alias
    uri = pinned.uri if pinned is not None else ref
    configure_mlflow(settings)
    with tempfile.TemporaryDirectory(prefix="meddiffuse-registry-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        generator = load_generator(local, store=None, settings=settings, device=device)
    generator.ref = uri
    generator.pinned = pinned
    return generator
