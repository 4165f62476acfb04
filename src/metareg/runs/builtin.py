"""Meta-trained checkpoints shipped with metareg: ``metareg test --checkpoint builtin:NAME``.

Each lives in ``metareg/runs/builtin/NAME/``: a checkpoint (``checkpoint.json`` with the config,
``checkpoint-<step>.safetensors`` with the parameters only: no optimizer state or generators, so
each is a few hundred KB) and ``provenance.json``: how it was made (the command, the git revision,
the machine, the training time, the iterations) and what it scored (the test result, with its
protocol). The checkpoint's SHA-256 is checked on every load, as for any checkpoint, and the
provenance records it too: a file swapped or edited is refused.

:func:`pack` makes one from a finished run folder (a maintainer's step, ``metareg checkpoints
--pack RUN NAME``); ``metareg checkpoints`` lists what ships.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    read_checkpoint_meta,
    read_record,
    save_checkpoint,
    write_json_atomic,
)
from ..errors import CheckpointError, ConfigError

FOLDER = Path(__file__).with_name("builtin")
PREFIX = "builtin:"
FORMAT = "metareg-builtin-checkpoint"


def is_builtin(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def available() -> list[str]:
    return sorted(p.parent.name for p in FOLDER.glob("*/provenance.json"))


def resolve(spec: str | Path) -> Path:
    """``builtin:NAME`` -> the shipped run folder (other specs are returned unchanged), checked
    against its provenance record."""
    if not is_builtin(spec):
        return Path(spec)
    name = str(spec)[len(PREFIX) :]
    folder = FOLDER / name
    if name not in available():
        raise CheckpointError(
            f"no built-in checkpoint {name!r}; `metareg checkpoints` lists them: {', '.join(available()) or 'none'}"
        )
    record = provenance(name)
    _, meta = read_checkpoint_meta(folder, CHECKPOINT)
    if meta.get("sha256") != record.get("sha256") or meta.get("tensors") != record.get("tensors"):
        raise CheckpointError(
            f"built-in checkpoint {name}: its checkpoint.json does not match its provenance record (edited files?); "
            "reinstall metareg"
        )
    return folder


def provenance(name: str) -> dict[str, Any]:
    return read_record(FOLDER / name / "provenance.json", FORMAT, "built-in checkpoint record") | {"name": name}


def _git_revision(cwd: Path) -> str:
    try:
        git = shutil.which("git") or "git"
        done = subprocess.run([git, "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)  # noqa: S603
        dirty = subprocess.run(  # noqa: S603
            [git, "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (
        done.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")
        if done.returncode == 0
        else "unknown"
    )


def pack(run: str | Path, name: str, *, command: str, machine: str, note: str = "", folder: Path = FOLDER) -> Path:
    """Ship the finished run ``run`` as built-in checkpoint ``name``: its parameters, its config
    (without the maintainer's data root), and its provenance (``command``: how it was trained;
    ``machine``: where; ``note``: what a user must know, e.g. a CPU budget), with its test result."""
    tensors, meta = load_checkpoint(run, CHECKPOINT)
    if meta.get("kind", "bilevel") != "bilevel":
        raise ConfigError("only episodic (metareg train) runs are shipped as built-in checkpoints")
    test = Path(run) / "test.json"
    if not test.is_file():
        raise ConfigError(f"{run} has no test.json: test it before shipping it")
    config = meta["config"] | {"data": meta["config"]["data"] | {"root": None}}
    target = folder / name
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target} exists: remove it first")
    params = {k: v for k, v in tensors.items() if k.startswith("param.")}
    json_path = save_checkpoint(
        target, CHECKPOINT, params, {"config": config, "kind": "bilevel", "seconds": meta.get("seconds")}, meta["step"]
    )
    record = json.loads(json_path.read_text())
    result = json.loads(test.read_text())
    write_json_atomic(
        target / "provenance.json",
        {
            "format": FORMAT,
            "tensors": record["tensors"],
            "sha256": record["sha256"],
            "preset": config.get("preset"),
            "iterations": meta["step"],
            "training_seconds": round(float(meta.get("seconds") or 0), 1),
            "command": command,
            "git_revision": _git_revision(Path(__file__).parent),
            "machine": machine,
            "note": note,
            "test": {
                "mean": result["mean"],
                "ci95": result["ci95"],
                "episodes": result["episodes"],
                "protocol": result["protocol"],
            },
        },
    )
    return target
