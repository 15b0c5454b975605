"""Training checkpoints in the object store, committed by a ``checkpoint.json`` written last.

``accelerate`` writes the full training state (model, optimizer, LR schedule, grad scaler, RNG states
and registered objects such as the EMA) into a local folder; we upload its files under
``<prefix>/checkpoints/step-<n>/`` and then the JSON that lists them with their hashes. A folder without
its JSON (an upload killed half-way) is ignored and swept away by the next save.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from meddiffuse.store.base import CorruptObject, ObjectStore, sha256_hex

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_JSON = "checkpoint.json"


class CheckpointInfo(BaseModel):
    step: int
    horizon: int = Field(description="LR-schedule length the run was started with.")
    config_fingerprint: str
    dataset_id: str
    seed: int
    num_processes: int = 1
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")


def checkpoints_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{CHECKPOINTS_DIR}"


def checkpoint_prefix(prefix: str, step: int) -> str:
    return f"{checkpoints_prefix(prefix)}/step-{step:09d}"


def list_checkpoints(store: ObjectStore, prefix: str) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first."""
    infos = [
        CheckpointInfo.model_validate_json(store.get(key))
        for key in store.list(f"{checkpoints_prefix(prefix)}/")
        if key.endswith(f"/{CHECKPOINT_JSON}")
    ]
    return sorted(infos, key=lambda info: info.step)


def latest_checkpoint(store: ObjectStore, prefix: str) -> CheckpointInfo | None:
    infos = list_checkpoints(store, prefix)
    return infos[-1] if infos else None


def upload_checkpoint(
    store: ObjectStore, prefix: str, local_dir: Path, info: CheckpointInfo, keep: int = 2
) -> CheckpointInfo:
    """Upload a saved accelerate state, commit it, then drop older and uncommitted checkpoints."""
    target = checkpoint_prefix(prefix, info.step)
    files = store.put_folder(local_dir, target)
    info = info.model_copy(update={"files": files})
    store.put_text(f"{target}/{CHECKPOINT_JSON}", info.model_dump_json(indent=2))
    _prune(store, prefix, keep)
    return info


def download_checkpoint(store: ObjectStore, prefix: str, info: CheckpointInfo, local_dir: Path) -> Path:
    """Fetch a committed checkpoint's files into ``local_dir``, checking every hash."""
    source = checkpoint_prefix(prefix, info.step)
    local_dir.mkdir(parents=True, exist_ok=True)
    for rel, digest in info.files.items():
        data = store.get(f"{source}/{rel}")
        if sha256_hex(data) != digest:
            raise CorruptObject(f"checkpoint file {source}/{rel} does not match its recorded hash")
        path = local_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return local_dir


def _prune(store: ObjectStore, prefix: str, keep: int) -> None:
    committed = [info.step for info in list_checkpoints(store, prefix)]
    keep_steps = set(committed[-keep:])
    root = f"{checkpoints_prefix(prefix)}/"
    folders = sorted({key[len(root):].split("/", 1)[0] for key in store.list(root)})
    for folder in folders:
        step = int(folder.removeprefix("step-")) if folder.startswith("step-") else -1
        if step in keep_steps:
            continue
        # withdraw the commit marker first, so a crash mid-delete never leaves a committed partial
        store.delete(f"{root}{folder}/{CHECKPOINT_JSON}")
        store.delete_prefix(f"{root}{folder}/")
