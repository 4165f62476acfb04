"""A meta-batch in chunks of tasks that fit a memory budget (``train.memory_budget``, ``train.task_chunk``).

The ``loop`` strategy keeps the graph of one task at a time whatever the meta-batch (with
recomputed inner steps, :mod:`metareg.meta.recompute`, one inner step's); ``vmap`` builds one graph
for all the tasks it batches, so its memory grows with the meta-batch. Chunked, it differentiates
``sum(losses of the chunk) / num_tasks`` chunk after chunk, accumulating the same meta-gradient in
``.grad`` (up to the order of the float sums).

The chunk size is given (``task_chunk``) or derived from a budget in MiB: the tasks of a chunk
must fit in it, one task's cost measured once per task shape. On CUDA that is the allocator's peak
over the first task's forward and backward (run as a chunk of one, so nothing is spent twice); on a
CPU, where the allocator keeps no statistics, it is an estimate: the bytes of the tensors the graph
of one task saves on the loop path (``torch.func``, which ``vmap`` uses, accepts no saved-tensor
hooks), measured on a probe that leaves the random stream untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

MIB = 2**20


class _Saved:
    """A tensor saved for the backward pass, held through the saved-tensor hooks."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the bytes of the distinct storages that its result's autograd graph still keeps
    for the backward pass when it returns (graphs built and freed inside ``fn`` do not count)."""
    held: weakref.WeakSet[_Saved] = weakref.WeakSet()

    def pack(t: torch.Tensor) -> _Saved:
        saved = _Saved(t)
        held.add(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        out = fn()
    storages = {
        (s.tensor.device, s.tensor.untyped_storage().data_ptr()): s.tensor.untyped_storage().nbytes() for s in held
    }
    return out, sum(storages.values())


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``fn()`` and the CUDA allocator's peak above what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - before


def chunk_size(budget_mib: float, task_bytes: int, num_tasks: int) -> int:
    """The most tasks (at most ``num_tasks``) whose measured cost fits ``budget_mib``."""
    fits = int(budget_mib * MIB // max(task_bytes, 1))
    if fits < 1:
        raise ConfigError(
            f"one task needs about {task_bytes / MIB:.0f} MiB, more than train.memory_budget={budget_mib:g} MiB: "
            "raise the budget, or recompute the inner steps (train.recompute=true, train.strategy=loop)"
        )
    return min(fits, num_tasks)
