"""Shipping a tested run as a built-in checkpoint (a maintainer's step, ``metareg checkpoints --pack
RUN --name NAME``): its parameters, its config and its provenance go into ``metareg/builtin/NAME``
(:mod:`metareg.builtin`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from ..builtin import FOLDER, FORMAT
from ..checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, write_json_atomic
from ..errors import ConfigError


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
