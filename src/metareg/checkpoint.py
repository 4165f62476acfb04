"""Checkpoints: tensors in safetensors, everything else in JSON, committed atomically and durably.

A checkpoint ``NAME`` in a run folder is ``NAME.json`` plus the tensor file it names
(``NAME-<step>.safetensors``, a plain file name in the same folder: anything else in a record is
refused, so a tampered record can never make metareg read, overwrite or delete a file elsewhere).
A save writes the new tensor file under a new name (fsync-ed before its rename), then replaces the
JSON (the commit point, via a temporary file, ``os.replace`` and an fsync of the folder), and only
then removes the previous tensor file. A run killed or a machine losing power at any moment leaves
the previous or the new checkpoint, never a torn one. The JSON records the tensor file's SHA-256,
so a corrupt or swapped file is detected on load. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from .errors import CheckpointError, ConfigError, MetaregError
from .files import read_json, write_bytes_atomic, write_json_atomic

CHECKPOINT = "checkpoint"  # the name of every run's checkpoint (checkpoint.json + checkpoint-<step>.safetensors)
FORMAT = "metareg-checkpoint"
VERSION = 1

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "VERSION",
    "check_run_folder",
    "describe_kept",
    "load_checkpoint",
    "read_checkpoint_meta",
    "read_record",
    "resolve_checkpoint",
    "restore_rng",
    "rng_tensors",
    "save_checkpoint",
    "state_to_tensors",
    "tensors_to_state",
    "verified_tensors",
    "write_json_atomic",
    "write_safetensors_atomic",
]


def write_safetensors_atomic(path: Path, tensors: dict[str, Tensor]) -> str:
    """Write ``tensors`` (moved to the CPU) to ``path`` atomically and durably, with the file mode
    the process's umask gives (as for the JSON beside it); returns the file's SHA-256."""
    data = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _tensor_name(json_path: Path, record: dict[str, Any], pattern: str = r"[^/\\]+\.safetensors") -> Path:
    """The tensor file a record names: a plain ``.safetensors`` file name in the record's folder."""
    name = record.get("tensors")
    if not isinstance(name, str) or not re.fullmatch(pattern, name) or name.startswith(".") or "\0" in name:
        raise CheckpointError(
            f"{json_path} names tensor file {name!r}, which is not a plain .safetensors file name in its own "
            "folder: the record is damaged or was edited; restore it or start a new run"
        )
    return json_path.parent / name


def check_run_folder(folder: Path, resume: bool, name: str = "checkpoint") -> None:
    """A new run must not overwrite a checkpoint; ``resume`` needs one."""
    has_checkpoint = (folder / f"{name}.json").exists()
    if has_checkpoint and not resume:
        raise ConfigError(
            f"run folder {folder} already holds a checkpoint: pass --resume to continue it, or choose another --out"
        )
    if resume and not has_checkpoint:
        raise CheckpointError(f"nothing to resume: {folder} holds no {name}.json")


def _checkpoint_pattern(name: str) -> str:
    return rf"{re.escape(name)}-\d+\.safetensors"


def save_checkpoint(folder: str | Path, name: str, tensors: dict[str, Tensor], meta: dict[str, Any], step: int) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-able) as checkpoint ``name`` in ``folder``. If the disk
    refuses (full, read-only), a :class:`CheckpointError` says so and the previous checkpoint is
    intact."""
    folder = Path(folder)
    json_path = folder / f"{name}.json"
    old = _previous_tensor_file(json_path, name)
    kept = describe_kept(folder, name)
    tensor_path = folder / f"{name}-{step:08d}.safetensors"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = write_safetensors_atomic(tensor_path, tensors)
        record = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "tensors": tensor_path.name,
            "sha256": digest,
        } | meta
        write_json_atomic(json_path, record)
    except OSError as err:
        if old != tensor_path:
            tensor_path.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} in {folder} ({err.strerror or err}); {kept}. "
            "Free disk space or fix the folder's permissions, then continue with --resume"
        ) from None
    if old is not None and old != tensor_path:
        old.unlink(missing_ok=True)  # only now: the new JSON is durable
    return json_path


def describe_kept(folder: Path, name: str = "checkpoint") -> str:
    """Which checkpoint ``folder`` holds now, for messages about a run that stopped."""
    path = Path(folder) / f"{name}.json"
    if not path.exists():
        return "no checkpoint was written"
    try:
        step = read_checkpoint_meta(path, name)[1]["step"]
    except MetaregError:
        return f"{path} is damaged"
    return f"the last good checkpoint ({path}, step {step}) is kept"


def _previous_tensor_file(json_path: Path, name: str) -> Path | None:
    """The tensor file of the checkpoint being replaced, if its record names one of this
    checkpoint's own files (never anything else: a damaged record deletes nothing)."""
    try:
        return _tensor_name(json_path, json.loads(json_path.read_text()), _checkpoint_pattern(name))
    except (OSError, ValueError, TypeError, AttributeError, CheckpointError):
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
    record = read_json(path, what)
    if record.get("format") != form:
        raise CheckpointError(f"{path} is not a metareg {what}")
    return record


def record_step(meta: dict[str, Any], json_path: Path) -> int:
    """The step a checkpoint record holds: a whole number >= 0, else the record is damaged."""
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f"{json_path} holds step {step!r}, not a whole number >= 0: the record is damaged or was edited; restore "
            "it or start a new run"
        )
    return step


def read_checkpoint_meta(path: str | Path, name: str = "checkpoint") -> tuple[Path, dict[str, Any]]:
    """The checkpoint's JSON path and contents, checked to be a metareg checkpoint of this version."""
    json_path = resolve_checkpoint(path, name)
    meta = read_record(json_path, FORMAT, "checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{json_path} has checkpoint version {meta.get('version')}; this metareg reads version {VERSION}"
        )
    record_step(meta, json_path)
    return json_path, meta


def verified_tensors(json_path: Path, record: dict[str, Any]) -> dict[str, Tensor]:
    """The safetensors file a JSON record names (``tensors``, a plain file name beside it), checked
    against its ``sha256``."""
    tensor_path = _tensor_name(json_path, record)
    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{json_path} names tensor file {tensor_path.name}, which is missing") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {tensor_path} ({err.strerror or err}); check its permissions") from None
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointError(f"{tensor_path} is corrupt or does not belong to {json_path.name} (checksum mismatch)")
    try:
        return load_bytes(data)
    except (SafetensorError, ValueError) as err:
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
            out[key] = {
                "__dict__": state_to_tensors(path, {str(k): v for k, v in value.items()}, tensors),
                "__int_keys__": all(isinstance(k, int) for k in value),
            }
        elif isinstance(value, (list, tuple)):
            out[key] = {
                "__list__": [state_to_tensors(f"{path}.{i}", {"v": v}, tensors)["v"] for i, v in enumerate(value)]
            }
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
