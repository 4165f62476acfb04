"""A run folder: its resolved config (``config.json``, and the config every checkpoint records),
its kind, the checks a new or resumed run makes on it, and the one way its side files are read
(:func:`read_result` for ``test.json`` and every result file, :func:`metareg.files.read_json` for
the others): a damaged file is one line naming it, never a traceback or a wrong number."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT, check_run_folder, read_checkpoint_meta, write_json_atomic
from .config import SCHEMAS, validate
from .errors import CheckpointError, ConfigError, MetaregError
from .files import read_json


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
        return kind, _stored_config(kind, stored, folder / "config.json")
    json_path, meta = read_checkpoint_meta(path, CHECKPOINT)
    kind = meta.get("kind", "bilevel")
    if kind not in SCHEMAS:
        raise CheckpointError(f"{json_path} is a run of unknown kind {kind!r}")
    return kind, _stored_config(kind, meta.get("config"), json_path)


def _stored_config(kind: str, values: Any, path: Path) -> Any:
    """The config a run stored (its checkpoint record or config.json), checked like a new one."""
    try:
        config = SCHEMAS[kind].from_dict(values)
        validate(config)
    except (KeyError, TypeError, MetaregError) as err:
        raise CheckpointError(f"{path} holds no valid {kind} config ({err})") from None
    return config


def read_record_json(path: Path) -> dict[str, Any]:
    return read_json(path, "run config")


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def read_result(path: str | Path) -> dict[str, Any]:
    """A test result metareg wrote (a run's ``test.json``, ``metareg test --out FILE``): a mapping
    with the ``protocol`` it was measured on and one finite score per episode (or test image), and
    finite calibration numbers where it has them. Anything else is one CheckpointError naming the
    file: a result that is not one is never compared, printed or reused."""
    path = Path(path)
    values = read_json(path, "test result written by metareg")
    scores = values.get("scores")
    if not isinstance(values.get("protocol"), dict) or not isinstance(scores, list) or not scores:
        raise CheckpointError(
            f"{path} is not a test result written by metareg (it needs its 'protocol' and the list of 'scores')"
        )
    if not _numbers(scores):
        raise CheckpointError(
            f"{path} holds scores that are not all finite numbers (NaN, infinite or text): it is damaged or was "
            "edited; test the model again"
        )
    bad = [
        k
        for k in ("mean", "nll", "ece", "final_train_accuracy")
        if values.get(k) is not None and not _numbers([values[k]])
    ]
    if "ci95" in values and not (isinstance(values["ci95"], (int, float)) and not isinstance(values["ci95"], bool)):
        bad.append("ci95")  # (NaN for a single episode: no interval)
    if "episode_nll" in values and not (_numbers(values["episode_nll"]) and len(values["episode_nll"]) == len(scores)):
        bad.append("episode_nll")
    reliability = values.get("reliability")
    if reliability is not None and not (
        isinstance(reliability, dict) and all(isinstance(reliability.get(k), list) for k in ("count", "confidence"))
    ):
        bad.append("reliability")
    if bad:
        raise CheckpointError(f"{path} holds a damaged {', '.join(bad)}: it is damaged or was edited; test again")
    return values


def config_of_run(path: str | Path, kind: str) -> Any:
    """The stored config of a run that must be of ``kind``."""
    found, config = read_run(path)
    if found != kind:
        raise CheckpointError(f"{path} is a {found} run, not a {kind} run: run it with `{SCHEMAS[found].command}`")
    return config
