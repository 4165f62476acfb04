"""What the engine consumes: a batch of few-shot tasks, each a support and a query set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """B tasks stacked on a leading dimension: what :meth:`~metareg.BilevelLearner.meta_backward`
    consumes and what the data sets' ``sample(num_tasks, generator)`` returns.

    Classification: ``support_x`` is ``[B, way*shot, C, H, W]`` float in [0, 1], ``support_y`` is
    ``[B, way*shot]`` long in ``0..way-1`` (labels shuffled per task); the query set likewise.
    Regression: ``x`` is ``[B, n, 1]`` and ``y`` is ``[B, n, 1]`` float.

    Args:
        support_x: the support (inner-loop training) inputs.
        support_y: their labels or targets.
        query_x: the query (outer-loop test) inputs.
        query_y: their labels or targets.

    Examples:
        ```python
        import torch
        import metareg

        x = torch.linspace(-5, 5, 20).reshape(2, 10, 1)            # 2 regression tasks of 10 points
        batch = metareg.TaskBatch(x[:, :5], x[:, :5].sin(), x[:, 5:], x[:, 5:].sin())
        assert batch.num_tasks == 2
        ```
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return TaskBatch(*(move(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))

    def task(self, i: int) -> TaskBatch:
        """The i-th task as a batch of one."""
        return self.tasks(range(i, i + 1))

    def tasks(self, which: range) -> TaskBatch:
        """The tasks ``which`` (a contiguous range) as a batch."""
        return TaskBatch(
            *(t[which.start : which.stop] for t in (self.support_x, self.support_y, self.query_x, self.query_y))
        )


class TaskSource(Protocol):
    """Anything that samples task batches reproducibly from a ``torch.Generator``. Sources that can
    produce their batches on a device (the image samplers) also have ``to(device)``."""

    is_classification: bool

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


class IndexedTaskSource(TaskSource, Protocol):
    """A source that draws a batch's image indices on the host and gathers the images where they
    are (the image samplers): ``sample`` is ``gather(*draw(...))``, and a captured CUDA graph
    replays the gather."""

    def draw(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...

    def gather(self, rows: Tensor, turns: Tensor) -> TaskBatch: ...


def on_device(source: TaskSource, device: torch.device | str) -> TaskSource:
    """``source`` producing its batches on ``device`` when it can (images moved there once), else
    itself (its small batches are moved when used)."""
    device = torch.device(device)
    return source.to(device) if device.type != "cpu" and hasattr(source, "to") else source
