"""Steps: the transforms that end a chain and turn gradients into updates."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import GradientTransform, Grads, param_key


class SGD(GradientTransform):
    """MAML's plain step: ``update = -alpha * g`` with a fixed step size alpha."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def update(self, grads: Grads, state, step: int) -> tuple[Grads, None]:  # noqa: ARG002 (the protocol)
        return {name: -self.lr * g for name, g in grads.items()}, state

    def extra_repr(self) -> str:
        return f"lr={self.lr}"


class MetaSGD(GradientTransform):
    """Meta-SGD (Li et al. 2017): ``update = -alpha o g`` with a meta-learned alpha per weight.

    alpha has the shape of each fast parameter and starts at ``lr`` everywhere.
    """

    def __init__(self, params: dict[str, Tensor], lr: float):
        super().__init__()
        self.fast_names = tuple(params)
        self.lr = nn.ParameterDict(
            {param_key(name): nn.Parameter(torch.full_like(p, lr)) for name, p in params.items()}
        )

    def update(self, grads: Grads, state, step: int) -> tuple[Grads, None]:  # noqa: ARG002 (the protocol)
        return {name: -self.lr[param_key(name)] * g for name, g in grads.items()}, state


class PerStepSGD(GradientTransform):
    """A meta-learned scalar step size per inner step and parameter tensor (MAML++'s LSLR)."""

    def __init__(self, params: dict[str, Tensor], lr: float, steps: int):
        super().__init__()
        self.fast_names = tuple(params)
        self.lr = nn.ParameterDict(
            {param_key(name): nn.Parameter(torch.full((steps,), lr, dtype=p.dtype)) for name, p in params.items()}
        )

    def update(self, grads: Grads, state, step: int) -> tuple[Grads, None]:
        lrs = self.lr
        return {
            name: -lrs[param_key(name)][min(step, lrs[param_key(name)].numel() - 1)] * g for name, g in grads.items()
        }, state
