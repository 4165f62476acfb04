"""Checkpoints: tensors in safetensors, everything else in JSON, committed atomically.

A checkpoint ``NAME`` in a run folder is ``NAME.json`` plus the tensor file it names
(``NAME-<step>.safetensors``). A save writes the new tensor file under a new name, then replaces the
JSON (the commit point, via a temporary file and ``os.replace``), then removes the old tensor file.
A run killed at any moment leaves the previous or the new checkpoint, never a torn one. The JSON
records the tensor file's SHA-256, so a corrupt or swapped file is detected on load. Nothing is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CheckpointError, ConfigError

FORMAT = "metareg-checkpoint"
VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_safetensors_atomic(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` (moved to the CPU) to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def check_run_folder(folder: Path, resume: bool, name: str = "checkpoint") -> None:
    """A new run must not overwrite a checkpoint; ``resume`` needs one."""
    has_checkpoint = (folder / f"{name}.json").exists()
    if has_checkpoint and not resume:
        raise ConfigError(f"run folder {folder} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if resume and not has_checkpoint:
        raise CheckpointError(f"nothing to resume: {folder} holds no {name}.json")


def save_checkpoint(folder: str | Path, name: str, tensors: dict[str, Tensor], meta: dict[str, Any], step: int) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-able) as checkpoint ``name`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    old = _tensor_file(json_path) if json_path.exists() else None
    tensor_path = folder / f"{name}-{step:08d}.safetensors"
    write_safetensors_atomic(tensor_path, tensors)
    record = {"format": FORMAT, "version": VERSION, "step": step, "tensors": tensor_path.name, "sha256": sha256_file(tensor_path)} | meta
    write_json_atomic(json_path, record)
    if old is not None and old != tensor_path and old.exists():
        old.unlink()
    return json_path


def _tensor_file(json_path: Path) -> Path | None:
    try:
        return json_path.parent / json.loads(json_path.read_text())["tensors"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_checkpoint(path: str | Path, name: str = "checkpoint") -> Path:
    """A run folder or a checkpoint JSON file -> the checkpoint JSON path."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{name}.json"
    elif path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: pass the checkpoint's .json file or its run folder, not the tensor file")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a run folder holding {name}.json, or that file)")
    return path


def read_record(path: Path, form: str, what: str) -> dict[str, Any]:
    """A JSON record of format ``form`` (a checkpoint, a stored phi), or a CheckpointError naming ``what``."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable {what} ({type(err).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != form:
        raise CheckpointError(f"{path} is not a metareg {what}")
    return record


def read_checkpoint_meta(path: str | Path, name: str = "checkpoint") -> tuple[Path, dict[str, Any]]:
    """The checkpoint's JSON path and contents, checked to be a metareg checkpoint of this version."""
    json_path = resolve_checkpoint(path, name)
    meta = read_record(json_path, FORMAT, "checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{json_path} has checkpoint version {meta.get('version')}; this metareg reads version {VERSION}")
    return json_path, meta


def verified_tensors(json_path: Path, record: dict[str, Any]) -> dict[str, Tensor]:
    """The safetensors file a JSON record names (``tensors``), checked against its ``sha256``."""
    tensor_path = json_path.parent / str(record.get("tensors"))
    if not tensor_path.is_file():
        raise CheckpointError(f"{json_path} names tensor file {tensor_path.name}, which is missing")
    if sha256_file(tensor_path) != record.get("sha256"):
        raise CheckpointError(f"{tensor_path} is corrupt or does not belong to {json_path.name} (checksum mismatch)")
    try:
        return load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{tensor_path} cannot be read: {err}") from None


def load_checkpoint(path: str | Path, name: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load and verify a checkpoint; raise CheckpointError if it is missing, corrupt or foreign."""
    json_path, meta = read_checkpoint_meta(path, name)
    return verified_tensors(json_path, meta), meta


def state_to_tensors(prefix: str, state: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Split a nested state (optimizer state) into tensors (stored under ``prefix``) and JSON."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Tensor):
            tensors[path] = value
            out[key] = {"__tensor__": path}
        elif isinstance(value, dict):
            out[key] = {"__dict__": state_to_tensors(path, {str(k): v for k, v in value.items()}, tensors), "__int_keys__": all(isinstance(k, int) for k in value)}
        elif isinstance(value, (list, tuple)):
            out[key] = {"__list__": [state_to_tensors(f"{path}.{i}", {"v": v}, tensors)["v"] for i, v in enumerate(value)]}
        else:
            out[key] = value
    return out


def tensors_to_state(meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Inverse of :func:`state_to_tensors`."""

    def decode(value: Any) -> Any:
        if isinstance(value, dict) and "__tensor__" in value:
            key = value["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint lacks tensor {key}")
            return tensors[key]
        if isinstance(value, dict) and "__dict__" in value:
            inner = {k: decode(v) for k, v in value["__dict__"].items()}
            return {int(k): v for k, v in inner.items()} if value.get("__int_keys__") and inner else inner
        if isinstance(value, dict) and "__list__" in value:
            return [decode(v) for v in value["__list__"]]
        return value

    return {k: decode(v) for k, v in meta.items()}


def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, Tensor]:
    """RNG states as uint8 tensors: torch's global CPU (and CUDA) generators and named ones."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    out |= {f"rng.{name}": g.get_state() for name, g in generators.items()}
    return out


def restore_rng(tensors: dict[str, Tensor], generators: dict[str, torch.Generator]) -> None:
    try:
        torch.set_rng_state(tensors["rng.torch"])
        for name, g in generators.items():
            g.set_state(tensors[f"rng.{name}"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
            if states:
                torch.cuda.set_rng_state_all(states)
    except KeyError as err:
        raise CheckpointError(f"checkpoint lacks RNG state {err}") from None
