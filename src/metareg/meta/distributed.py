"""``torch.distributed`` for both schemes: processes started by ``torchrun`` each train a share of the
tasks. The joint scheme exchanges phi's gradient (and the logged metrics) every step and every
task's state when a checkpoint is written; the bilevel scheme exchanges each task's meta-gradient
(summed in task order on every process, so any number of processes gives one process's numbers),
and the meta-test splits its episodes and gathers their scores.

A process that dies or hangs makes the others' next collective fail after ``METAREG_DIST_TIMEOUT``
seconds (default 600): they stop with a :class:`~metareg.errors.DistributedError` naming what to do
(continue from the last checkpoint with ``--resume``, with any number of processes).

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything here is the single-process
identity, so the same trainer code runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError, DistributedError, one_line

TIMEOUT = float(os.environ.get("METAREG_DIST_TIMEOUT", "600"))


def _collective(op, *args):
    """Run a collective; a dead or stuck peer becomes one clear error instead of a hang or a traceback."""
    try:
        return op(*args)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"a process of this distributed run stopped or did not answer ({one_line(err, 200)}); "
            "every process stops: continue from the last checkpoint with --resume (any number of processes)"
        ) from None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, num_tasks: int) -> range:
        """This process's tasks: a contiguous block of ``num_tasks / size`` (which must divide)."""
        if num_tasks % self.size:
            raise ConfigError(
                f"{num_tasks} tasks cannot be shared equally by {self.size} processes; "
                "use a number of processes that divides the number of tasks"
            )
        return self.block(num_tasks)

    def all_reduce_sum(self, flat: Tensor) -> Tensor:
        if self.distributed:
            _collective(dist.all_reduce, flat, dist.ReduceOp.SUM)
        return flat

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Make every process hold rank 0's values."""
        if self.distributed:
            for t in tensors:
                _collective(dist.broadcast, t.data, 0)

    def gather_tasks(self, local: Tensor) -> Tensor:
        """``local`` [T_local, ...] of every process, concatenated in rank order: [T, ...]."""
        if not self.distributed:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        _collective(dist.all_gather, parts, local.contiguous())
        return torch.cat(parts)

    def block(self, count: int, rank: int | None = None) -> range:
        """Process ``rank``'s (default: this one's) contiguous block of ``count`` items; the first
        ``count % size`` blocks hold one more item."""
        rank = self.rank if rank is None else rank
        per, extra = divmod(count, self.size)
        start = rank * per + min(rank, extra)
        return range(start, start + per + (rank < extra))

    def gather_blocks(self, local: Tensor, count: int) -> Tensor:
        """Every process's :meth:`block` of ``count`` rows, in order: [count, ...] (padded to equal
        lengths for the collective, then trimmed)."""
        if not self.distributed:
            return local
        longest = -(-count // self.size)
        padded = torch.zeros(longest, *local.shape[1:], dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = self.gather_tasks(padded).view(self.size, longest, *local.shape[1:])
        return torch.cat([parts[r][: len(self.block(count, r))] for r in range(self.size)])


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or a one-process world.
    On CUDA each process uses the GPU of its ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run in one process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT))
    return World(dist.get_rank(), dist.get_world_size(), device)


def teardown(world: World, *, together: bool = True) -> None:
    """Leave the process group. ``together`` (a normal end): first wait for every process (a
    barrier), so that none exits while another still works with the group open: a gloo process
    that exited while rank 0 was still writing the last checkpoint aborted at exit ("terminate
    called without an active exception", about 1 run in 20 on a loaded 2-core machine). After an
    error the others may be gone: no barrier."""
    if world.distributed and dist.is_initialized():
        if together:
            _collective(dist.barrier)
        dist.destroy_process_group()


@contextmanager
def session(device: torch.device) -> Iterator[World]:
    """The world of this command (torchrun's process group, or one process), torn down at the end
    if this session started it."""
    started = not (dist.is_available() and dist.is_initialized())
    world = setup(device)
    ended = False
    try:
        yield world
        ended = True
    finally:
        if started:
            teardown(world, together=ended)
