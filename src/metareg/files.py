"""Durable, atomic file writes and checksums: the one way metareg puts bytes on disk (and reads its
JSON records back: :func:`read_json`, damage in one line naming the file).

A file is written under a temporary name in its destination folder, flushed and ``fsync``-ed,
renamed over its final name with ``os.replace`` (atomic on POSIX), and the folder is ``fsync``-ed
so that the rename itself survives a power loss. A reader therefore sees the old file or the new
one, never a torn one. Files are created with ``open()``, so their mode follows the process's umask
like any other file the user creates (``tempfile.mkstemp`` would make them 0600, unreadable to the
other users of a shared folder). A failed write removes its temporary file and leaves the old file
untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (raises OSError if it cannot be read)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call (concurrent writers of the same
    file, such as two runs filling one data cache, never share a temporary file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


#: The names :func:`temporary_name` makes (and nothing else): ``.<name>.<pid>.<8 hex digits>.tmp`` or ``.part``.
TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.(?:tmp|part)")


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (only names :func:`temporary_name`
    makes, only plain files directly in it). Call it only while no other process writes there (with the
    folder's lock, :mod:`metareg.runlock`); returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        if TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON record metareg wrote (a checkpoint record, a run folder's ``test.json``,
    ``config.json``, ``selection.json``, ``robustness.json``, a provenance record), as a mapping.
    Any damage (missing, unreadable, cut off, not JSON, nested absurdly deep, not a mapping) is one
    :class:`~metareg.errors.CheckpointError` naming the file and ``what`` it should be (``"checkpoint"``)."""
    from .errors import CheckpointError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (a {what} was expected there)") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise CheckpointError(f"{path} is not a readable {what} ({reason})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not a readable {what} (damaged: {err.msg} at line {err.lineno}, column {err.colno}; cut off "
            "or edited): restore it, or remove it and run the command that wrote it again"
        ) from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path} is not a readable {what} (damaged: not plain JSON)") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} is not a {what} (it holds a JSON {type(values).__name__})")
    return values


@contextmanager
def atomic_open(path: Path, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO[Any]]:
    """Write ``path`` atomically: yields a file opened on a temporary name beside it; on a clean
    exit the file is fsync-ed and renamed over ``path`` and the folder fsync-ed; on an error the
    temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_name(path, suffix)
    try:
        with tmp.open(mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
