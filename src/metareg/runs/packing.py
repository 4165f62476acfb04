"""Shipping a tested run as a built-in checkpoint (a maintainer's step, ``metareg checkpoints --pack
RUN --name NAME``): its parameters, its config and its provenance go into ``metareg/builtin/NAME``
(:mod:`metareg.builtin`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..builtin import FOLDER, FORMAT, check_name, shipped_files
from ..checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    write_json_atomic,
)
from ..errors import ConfigError
from ..evaluate.stats import mean_ci
from ..runfolder import config_of_run, read_result


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
    check_name(name)
    tensors, meta = load_checkpoint(run, CHECKPOINT)
    if meta.get("kind", "bilevel") != "bilevel":
        raise ConfigError("only episodic (metareg train) runs are shipped as built-in checkpoints")
    test = Path(run) / "test.json"
    if not test.is_file():
        raise ConfigError(f"{run} has no test.json: test it before shipping it")
    config = config_of_run(run, "bilevel").to_dict()
    config["data"]["root"] = None  # (the maintainer's data folder is not the user's)
    target = folder / name
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target} exists: remove it first")
    result = read_result(test)
    score = mean_ci(result["scores"])
    step = meta["step"]  # (checked when the record was read)
    params = {k: v for k, v in tensors.items() if k.startswith("param.")}
    info = {"config": config, "kind": "bilevel", "seconds": meta.get("seconds")}
    save_checkpoint(target, CHECKPOINT, params, info, step)
    record = read_checkpoint_meta(target, CHECKPOINT)[1]
    write_json_atomic(
        target / "provenance.json",
        {
            "format": FORMAT,
            "files": shipped_files(target, record),  # every file it ships: an edited config is refused too
            "tensors": record["tensors"],
            "sha256": record["sha256"],
            "preset": config.get("preset"),
            "iterations": step,
            "training_seconds": round(float(meta.get("seconds") or 0), 1),
            "command": command,
            "git_revision": _git_revision(Path(__file__).parent),
            "machine": machine,
            "note": note,
            "test": {"mean": score.mean, "ci95": score.ci95, "episodes": score.n, "protocol": result["protocol"]},
        },
    )
    return target
