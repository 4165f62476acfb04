"""Meta-trained checkpoints shipped with metareg: ``builtin:NAME`` wherever a run folder is taken
(``metareg test --checkpoint builtin:NAME``, ``metareg.load("builtin:NAME")``).

Each lives in a folder of this package, ``metareg/builtin/NAME/``: a checkpoint (``checkpoint.json``
with the config, ``checkpoint-<step>.safetensors`` with the parameters only: no optimizer state or
generators, so each is a few hundred KB) and ``provenance.json``: how it was made (the command, the
git revision, the machine, the training time, the iterations) and what it scored (the test result,
with its protocol). The provenance records the SHA-256 of every file the checkpoint ships
(``files``: ``checkpoint.json``, whose config says how the model adapts, as well as the tensors),
checked on every use: a file swapped or edited (``config.inner.lr`` changed in ``checkpoint.json``)
is refused. ``metareg checkpoints`` lists them; maintainers make one with ``metareg checkpoints
--pack`` (:mod:`metareg.runs.packing`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT, read_checkpoint_meta, read_record
from ..errors import CheckpointError, ConfigError
from ..files import sha256_file

FOLDER = Path(__file__).parent


PREFIX = "builtin:"


FORMAT = "metareg-builtin-checkpoint"


#: A built-in checkpoint's name: a plain folder name of this package (never a path).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"built-in checkpoint name {name!r} must be a plain name (letters, digits, '.', '_', '-'; no path)"
        )
    return name


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
    shipped = record.get("files")
    _, meta = read_checkpoint_meta(folder, CHECKPOINT)
    needed = {f"{CHECKPOINT}.json", meta.get("tensors")}
    if not isinstance(shipped, dict) or not needed <= set(shipped) or not all(isinstance(k, str) for k in shipped):
        raise CheckpointError(
            f"built-in checkpoint {name}: its provenance record does not list the SHA-256 of every file it ships; "
            "reinstall metareg"
        )
    for file, digest in shipped.items():
        path = folder / file
        if Path(file).name != file or not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(
                f"built-in checkpoint {name}: the checksum of {file} does not match its provenance record (edited or "
                "swapped); reinstall metareg"
            )
    return folder


def shipped_files(folder: Path, meta: dict[str, Any]) -> dict[str, str]:
    """``{file: SHA-256}`` of what a built-in checkpoint ships (its record and its tensors), for its provenance."""
    return {file: sha256_file(folder / file) for file in (f"{CHECKPOINT}.json", meta["tensors"])}


def provenance(name: str) -> dict[str, Any]:
    return read_record(FOLDER / name / "provenance.json", FORMAT, "built-in checkpoint record") | {"name": name}
