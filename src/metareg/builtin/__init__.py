"""Meta-trained checkpoints shipped with metareg: ``builtin:NAME`` wherever a run folder is taken
(``metareg test --checkpoint builtin:NAME``, ``metareg.load("builtin:NAME")``).

Each lives in a folder of this package, ``metareg/builtin/NAME/``: a checkpoint (``checkpoint.json``
with the config, ``checkpoint-<step>.safetensors`` with the parameters only: no optimizer state or
generators, so each is a few hundred KB) and ``provenance.json``: how it was made (the command, the
git revision, the machine, the training time, the iterations) and what it scored (the test result,
with its protocol). The checkpoint's SHA-256 is checked on every load, as for any checkpoint, and the
provenance records it too: a file swapped or edited is refused. ``metareg checkpoints`` lists them;
maintainers make one with ``metareg checkpoints --pack`` (:mod:`metareg.runs.packing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT, read_checkpoint_meta, read_record
from ..errors import CheckpointError

FOLDER = Path(__file__).parent


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
