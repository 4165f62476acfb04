"""``torch.distributed`` for the joint scheme: processes started by ``torchrun`` each train a share of
the tasks; they exchange only phi's gradient (and the logged metrics) every step, and every task's
state when a checkpoint is written.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything here is the single-process
identity, so the same trainer code runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, num_tasks: int) -> list[int]:
        """This process's tasks: a contiguous block of ``num_tasks / size``."""
        if num_tasks % self.size:
            raise ConfigError(f"{num_tasks} tasks cannot be shared equally by {self.size} processes; "
                              "use a number of processes that divides the number of tasks")
        per = num_tasks // self.size
        return list(range(self.rank * per, (self.rank + 1) * per))

    def all_reduce_sum(self, flat: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Make every process hold rank 0's values."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def gather_tasks(self, local: Tensor) -> Tensor:
        """``local`` [T_local, ...] of every process, concatenated in rank order: [T, ...]."""
        if not self.distributed:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
