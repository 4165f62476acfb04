"""Seeds derived from a run's seed and a position (step, task, pass).

Ordinary training here draws its randomness (batch order, augmentation, perturbation noise) from
generators seeded by ``derive_seed(run_seed, ...)`` at each step instead of one long stream: a
resumed run then continues exactly without storing generator states, and a task's randomness is
the same whichever process (or batch of tasks) trains it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside the block torch's global generator (and ``device``'s, on CUDA) is seeded with ``seed``;
    afterwards the caller's random state is restored, so the block draws reproducible numbers
    without disturbing any other stream (evaluation, probes)."""
    device = torch.device(device) if device is not None else None
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
