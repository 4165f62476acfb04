"""A run folder: its resolved config (``config.json``, and the config every checkpoint records),
its kind, and the checks a new or resumed run makes on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT, check_run_folder, read_checkpoint_meta, write_json_atomic
from .config import SCHEMAS
from .errors import CheckpointError, ConfigError, MetaregError


def prepare_run_folder(out: Path, resume: bool, config: Any, main: bool = True, started: bool | None = None) -> None:
    """A new run needs a folder without a checkpoint (its resolved config goes to config.json);
    ``resume`` needs one with a checkpoint (or, with ``started``, whatever says the run began)."""
    if started is None:
        check_run_folder(out, resume, CHECKPOINT)
    elif started and not resume:
        raise ConfigError(
            f"run folder {out} already holds a started run: pass --resume to continue it, or choose another --out"
        )
    elif resume and not started:
        raise CheckpointError(f"nothing to resume: {out} holds no started run")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json_atomic(out / "config.json", {"kind": config.kind} | config.to_dict())


def read_run(path: str | Path) -> tuple[str, Any]:
    """(kind, config) of a run folder or its checkpoint.json, from the checkpoint's record (or, for a
    run that has none yet, such as a transfer still choosing its hyperparameters, its config.json)."""
    folder = Path(path)
    if folder.is_dir() and not (folder / f"{CHECKPOINT}.json").exists() and (folder / "config.json").is_file():
        stored = read_record_json(folder / "config.json")
        kind = stored.pop("kind", "bilevel")
        if kind not in SCHEMAS:
            raise CheckpointError(f"{folder / 'config.json'} is a run of unknown kind {kind!r}")
        try:
            return kind, SCHEMAS[kind].from_dict(stored)
        except (KeyError, TypeError, MetaregError) as err:
            raise CheckpointError(f"{folder / 'config.json'} holds no valid {kind} config ({err})") from None
    json_path, meta = read_checkpoint_meta(path, CHECKPOINT)
    kind = meta.get("kind", "bilevel")
    if kind not in SCHEMAS:
        raise CheckpointError(f"{json_path} is a run of unknown kind {kind!r}")
    try:
        return kind, SCHEMAS[kind].from_dict(meta["config"])
    except (KeyError, TypeError, MetaregError) as err:
        raise CheckpointError(f"{json_path} holds no valid {kind} config ({err})") from None


def read_record_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} is not a run's config")
    return values


def config_of_run(path: str | Path, kind: str) -> Any:
    """The stored config of a run that must be of ``kind``."""
    found, config = read_run(path)
    if found != kind:
        raise CheckpointError(f"{path} is a {found} run, not a {kind} run: run it with `{SCHEMAS[found].command}`")
    return config
