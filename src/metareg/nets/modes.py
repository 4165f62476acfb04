"""A module's train/eval mode for the span of a block, and how far its training is (schedules)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, cast

from torch import nn


class _Scheduled(Protocol):
    def set_training_progress(self, fraction: float) -> None: ...


class _Annealed(Protocol):
    strength: float


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (batch norm and MetaPerturb on their running
    statistics, DropGrad off); its previous mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def set_training_progress(module: nn.Module, fraction: float) -> None:
    """Tell every scheduled part of ``module`` (DropGrad's linear rate, MetaPerturb's annealed
    strength: anything with a ``set_training_progress`` method) how far training is, in [0, 1]."""
    for part in module.modules():
        if part is not module and hasattr(part, "set_training_progress"):
            cast(_Scheduled, part).set_training_progress(fraction)


def perturbation_strength(module: nn.Module) -> float:
    """The current strength c of ``module``'s annealed perturbation (MetaPerturb), 1 if none anneals."""
    return next((float(cast(_Annealed, part).strength) for part in module.modules() if hasattr(part, "strength")), 1.0)


def scheduled(module: nn.Module) -> bool:
    """Whether a part of ``module`` changes with training progress (a ``scheduled`` property: a
    DropGrad rate ramp, MetaPerturb's annealing), which a captured CUDA graph could not follow."""
    return any(getattr(part, "scheduled", False) for part in module.modules())
