"""Durable, atomic file writes and checksums: the one way metareg puts bytes on disk.

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
