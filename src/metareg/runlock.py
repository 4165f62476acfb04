"""One writer per run folder: a lock file in the folder, ``fcntl.flock``-ed by the process that
writes there.

Every command that writes into a run folder (``metareg train``, ``perturb meta-train``, ``perturb
transfer`` and its Base and ``--select`` folders, ``test`` writing ``test.json``, ``plot
robustness`` writing its cache, ``reproduce`` for its experiment folder) holds the folder's lock
while it works; a second writer is refused in one line that names the process holding it. Under
torchrun the first process holds it and the others learn whether it could (one collective), so a
refused run stops on every process at once.

The lock is the kernel's: ``flock`` belongs to the open file, so it is released when the process
exits, however it exits (an exception, Ctrl-C, ``kill -9``, a machine reset). The file
(:data:`LOCK_NAME`) stays behind and is harmless: an unlocked file is free, whatever it says; it
only records who held it last, for the message. Taking the lock also removes the hidden temporary
files a killed writer left in the folder (:func:`metareg.files.remove_temporaries`): with the lock
held, nobody else can be writing them.

Within one process the lock is re-entrant (``metareg train`` holds it around training and the final
test). Where ``fcntl`` does not exist (Windows), folders are not locked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import remove_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".metareg.lock"

_held: dict[Path, list[Any]] = {}  # folder -> [file descriptor, depth] of the locks this process holds


def holds(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return Path(folder).resolve() in _held


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another metareg process"
    pid, _, command = text.partition(" ")
    return f"process {pid}: {command}" if pid.isdigit() else "another metareg process"


def _acquire(folder: Path) -> int | None:
    """The locked file's descriptor, or None if another process holds the lock."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {' '.join(['metareg', *sys.argv[1:]])}\n".encode())
    return fd


@contextmanager
def run_lock(folder: str | Path, world: Any = None) -> Iterator[None]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block, or raise a one-line
    :class:`~metareg.errors.ConfigError` if another process holds it. ``world`` (a
    :class:`~metareg.meta.distributed.World`): only its first process locks, and every process
    raises if it could not."""
    folder = Path(folder).resolve()
    if folder in _held:  # re-entered (alike on every process of a distributed run: no collective)
        _held[folder][1] += 1
        try:
            yield
        finally:
            _held[folder][1] -= 1
        return
    main = world is None or world.is_main
    fd = _acquire(folder) if main and fcntl is not None else None
    refused = main and fcntl is not None and fd is None
    if world is not None and world.distributed:
        import torch

        flag = torch.tensor([float(refused)], device=world.device)
        refused = bool(world.all_reduce_sum(flag).item())
    if refused:
        if fd is not None:
            os.close(fd)
        who = _holder(folder / LOCK_NAME) if main else "another metareg process (the first process could not lock it)"
        raise ConfigError(f"run folder {folder} is in use by {who}; wait for it to finish, or choose another --out")
    _held[folder] = [fd, 1]
    try:
        if fd is not None:
            remove_temporaries(folder)
        yield
    finally:
        _held[folder][1] -= 1
        if _held[folder][1] == 0:
            del _held[folder]
            if fd is not None:
                # unlock first: processes forked meanwhile (the parallel strategy's helpers) share the
                # lock through their copy of this descriptor, and closing ours alone would not free it
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
