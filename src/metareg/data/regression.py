"""Few-shot regression task families: sinusoids and polynomials.

* :class:`SineTasks`: ``y = A sin(w x + b)`` with ``A``, ``w``, ``b`` and the inputs ``x`` uniform
  in their ranges. The defaults (``A`` in [0.1, 5], ``w`` in [0.8, 1.2], ``b`` in [0, pi],
  ``x`` in [-5, 5]) are the setting of Meta-SGD (Li et al., 2017) and the MT-net thesis (Lee, 2018);
  ``frequency=(1.0, 1.0)`` gives MAML's fixed-frequency sinusoids (Finn et al., 2017).
* :class:`PolynomialTasks`: ``y = sum_i c_i x^i`` of a given order with coefficients ``c_0..c_n``
  uniform in ``coefficients`` (default [-1, 1]) and ``x`` uniform in ``x_range``.

Both are :class:`~metareg.data.tasks.TaskSource` with ``is_classification = False``: ``sample``
returns ``x`` and ``y`` shaped ``[B, n, 1]`` float32 (``n = shot`` for the support set, ``query`` for
the query set). Sampling is vectorized over tasks and uses only the given generator.
:meth:`sample_with_params` also returns each task's parameters, and :meth:`function` evaluates a
task on any inputs (to plot the true curve).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from .episodic import EpisodicDataset, register_episodic
from .tasks import TaskBatch

__all__ = ["PolynomialTasks", "SineTasks"]


def _count(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _interval(
    value: Any, name: str, where: str, *, strict: bool = False, min_low: float | None = None
) -> tuple[float, float]:
    """A validated ``(low, high)`` pair of finite floats with low <= high (low < high if strict)."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(f"{where}: {name} must be finite, got {value!r}")
    if low > high or (strict and low == high):
        relation = "<" if strict else "<="
        raise DataError(f"{where}: {name}=({low}, {high}) needs low {relation} high; swap or widen it")
    if min_low is not None and low < min_low:
        raise DataError(f"{where}: {name}=({low}, {high}) must not go below {min_low}")
    return low, high


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator).mul_(high - low).add_(low)


def _batch(x: Tensor, y: Tensor, shot: int) -> TaskBatch:
    """Split ``[B, shot+query]`` inputs/targets into a support and a query set, ``[B, n, 1]`` each."""
    x, y = x.unsqueeze(-1), y.unsqueeze(-1)
    return TaskBatch(
        x[:, :shot].contiguous(), y[:, :shot].contiguous(), x[:, shot:].contiguous(), y[:, shot:].contiguous()
    )


class _FunctionTasks:
    """Regression tasks y = f_params(x): subclasses give ``sample_params`` and ``function``."""

    is_classification = False
    shot: int
    query: int
    x_range: tuple[float, float]

    def sample_params(self, num_tasks: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def function(params: dict[str, Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_with_params(self, num_tasks: int, generator: torch.Generator) -> tuple[TaskBatch, dict[str, Tensor]]:
        """A batch of tasks and the parameters that generated it."""
        params = self.sample_params(num_tasks, generator)
        x = _uniform((num_tasks, self.shot + self.query), self.x_range, generator)
        return _batch(x, self.function(params, x), self.shot), params

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` tasks: support ``[B, shot, 1]``, query ``[B, query, 1]``."""
        return self.sample_with_params(num_tasks, generator)[0]


class SineTasks(_FunctionTasks):
    """Sinusoid regression tasks ``y = A sin(w x + b)`` (see the module docstring).

    Args:
        shot: support points per task.
        query: query points per task.
        amplitude: range of ``A`` (non-negative).
        frequency: range of ``w``; ``(1.0, 1.0)`` for MAML's fixed frequency.
        phase: range of ``b`` in radians.
        x_range: range of the inputs (low < high).
    """

    def __init__(
        self,
        shot: int,
        query: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        frequency: tuple[float, float] = (0.8, 1.2),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        where = "sine tasks"
        self.shot = _count(shot, "shot", where)
        self.query = _count(query, "query", where)
        self.amplitude = _interval(amplitude, "amplitude", where, min_low=0.0)
        self.frequency = _interval(frequency, "frequency", where)
        self.phase = _interval(phase, "phase", where)
        self.x_range = _interval(x_range, "x_range", where, strict=True)

    def __repr__(self) -> str:
        return (
            f"SineTasks(shot={self.shot}, query={self.query}, amplitude={self.amplitude}, "
            f"frequency={self.frequency}, phase={self.phase}, x_range={self.x_range})"
        )

    def sample_params(self, num_tasks: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``{"amplitude", "frequency", "phase"}``, each ``[B]``."""
        b = _count(num_tasks, "num_tasks", "sine tasks")
        return {
            "amplitude": _uniform((b,), self.amplitude, generator),
            "frequency": _uniform((b,), self.frequency, generator),
            "phase": _uniform((b,), self.phase, generator),
        }

    @staticmethod
    def function(params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``A sin(w x + b)`` for inputs ``x`` of shape ``[B, ...]`` (one task per leading index)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, w, b = (params[k].reshape(shape) for k in ("amplitude", "frequency", "phase"))
        return a * torch.sin(w * x + b)


class PolynomialTasks(_FunctionTasks):
    """Polynomial regression tasks ``y = sum_{i=0}^{order} c_i x^i`` (see the module docstring).

    Args:
        shot: support points per task.
        query: query points per task.
        order: the polynomial's degree n >= 0 (n + 1 coefficients).
        coefficients: range of each ``c_i``.
        x_range: range of the inputs (low < high).
    """

    def __init__(
        self,
        shot: int,
        query: int,
        order: int | None = None,
        coefficients: tuple[float, float] = (-1.0, 1.0),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        where = "polynomial tasks"
        self.shot = _count(shot, "shot", where)
        self.query = _count(query, "query", where)
        if order is None:
            raise DataError("polynomial tasks need an order: pass order=N (e.g. order=2)")
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise DataError(f"{where}: order must be an integer >= 0, got {order!r}")
        self.order = order
        self.coefficients = _interval(coefficients, "coefficients", where)
        self.x_range = _interval(x_range, "x_range", where, strict=True)

    def __repr__(self) -> str:
        return (
            f"PolynomialTasks(shot={self.shot}, query={self.query}, order={self.order}, "
            f"coefficients={self.coefficients}, x_range={self.x_range})"
        )

    def sample_params(self, num_tasks: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``{"coefficients": [B, order+1]}``, ``c_0`` first."""
        b = _count(num_tasks, "num_tasks", "polynomial tasks")
        return {"coefficients": _uniform((b, self.order + 1), self.coefficients, generator)}

    @staticmethod
    def function(params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``sum_i c_i x^i`` (Horner) for inputs ``x`` of shape ``[B, ...]``."""
        c = params["coefficients"]
        shape = (-1,) + (1,) * (x.dim() - 1)
        y = c[:, -1].reshape(shape).expand_as(x).clone()
        for i in range(c.shape[1] - 2, -1, -1):
            y = y * x + c[:, i].reshape(shape)
        return y


register_episodic(
    EpisodicDataset(
        "sine",
        SineTasks,
        regression=True,
        handled=("shot", "query"),
        description="sinusoid regression (MAML; the MT-net thesis's ranges)",
    )
)
register_episodic(
    EpisodicDataset(
        "polynomial",
        PolynomialTasks,
        regression=True,
        handled=("shot", "query"),
        description="polynomial regression of a given order (MT-net thesis Figure 6.1)",
    )
)
