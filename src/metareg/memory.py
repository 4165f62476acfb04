"""The memory a count implies, checked against the machine's before anything is allocated.

A count in a config (a meta-batch, Monte-Carlo samples, classes of a generated data set) fixes the
size of tensors long before they are made; a count of a billion would make the allocator fail deep
inside a run (or, with the kernel's overcommit, make the machine swap). :func:`require` refuses
such a count in one line that says what it would need. Estimates are lower bounds (the tensors
that must exist at once, never the activations around them), so a count that is refused can
never have fit, and the limit is the machine's whole memory (the device's for CUDA), not what
happens to be free.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def machine_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes of memory of ``device``: a GPU's total memory, or the machine's physical memory (or
    the container's limit, if lower); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for path in _CGROUP_LIMITS:
        try:
            limit = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        total = min(total, limit)
    return total


def size_text(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1024 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # unreachable


def require(nbytes: float, what: str, *, device: torch.device | str = "cpu", fix: str = "lower it") -> None:
    """Refuse (one-line :class:`~metareg.errors.ConfigError`) when ``what`` needs more than all of
    ``device``'s memory: ``"train.meta_batch=1000000000 needs at least 9.1 TB for ... (more than the
    15.5 GB of this machine's memory); lower it"``."""
    limit = machine_memory(device)
    if limit is None or nbytes <= limit:
        return
    where = "this machine's memory" if torch.device(device).type == "cpu" else f"the memory of {device}"
    raise ConfigError(f"{what} needs at least {size_text(nbytes)}, more than the {size_text(limit)} of {where}; {fix}")
