"""DropGrad (Tseng et al. 2020, Eq. 4-6): dropout on the inner-loop gradients.

    g' = g o n,   binary:   n ~ Bernoulli(1 - p) / (1 - p)          (Eq. 5)
                  Gaussian: n ~ N(1, p / (1 - p))                   (Eq. 6)

Both noises have mean 1 and variance p / (1 - p). A fresh n is drawn for every gradient element at
every inner step, during meta-training only (Algorithm 1); meta-testing adapts with the plain
gradient. ``layers`` (glob patterns over parameter names, or one of the named groups ``fc``,
``last-block+fc``, ``full``, ``first-block``) chooses what it touches: the paper's Table 2 compares
the FC layer, the last block + FC, the full network, and the input side.

``schedule="linear"`` ramps p from 0 to its value over meta-training (an extension, not in the
paper; the default is the paper's constant rate). The trainer reports its progress through
``set_training_progress``.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from torch import Tensor

from ..errors import ConfigError
from ..noise import check_dropout, dropout_noise
from .base import GradientTransform, Grads
from .registry import register

GROUPS = ("fc", "last-block+fc", "full", "first-block")


def layer_group(group: str, names: list[str]) -> list[str]:
    """The parameter patterns of DropGrad's Table 2 variants, for backbones whose blocks are
    ``blocks.<i>.*`` and whose classifier is ``head.*`` (Conv4/ConvN; ``layers.<i>`` for the MLP)."""
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith(("blocks.", "layers.")) and n.split(".")[1].isdigit()})
    prefix = "blocks" if any(n.startswith("blocks.") for n in names) else "layers"
    if group == "full":
        return ["*"]
    if group == "fc":
        return ["head.*"]
    if group == "last-block+fc" and blocks:
        return [f"{prefix}.{blocks[-1]}.*", "head.*"]
    if group == "first-block" and blocks:
        return [f"{prefix}.{blocks[0]}.*"]
    raise ConfigError(f"unknown DropGrad layer group {group!r} for this backbone; use one of {', '.join(GROUPS)} or a list of patterns")


class DropGrad(GradientTransform):
    def __init__(
        self,
        fast_params: dict[str, Tensor],
        p: float = 0.1,
        kind: Literal["binary", "gaussian"] = "gaussian",
        schedule: Literal["constant", "linear"] = "constant",
        layers: str | list[str] | tuple[str, ...] = ("*",),
    ):
        super().__init__()
        check_dropout("DropGrad", p, kind)
        if schedule not in ("constant", "linear"):
            raise ConfigError(f"DropGrad schedule must be constant or linear, got {schedule!r}")
        if isinstance(layers, str):
            layers = layer_group(layers, list(fast_params))
        self.names = [n for n in fast_params if any(fnmatch.fnmatchcase(n, pattern) for pattern in layers)]
        if not self.names:
            raise ConfigError(f"DropGrad layers {list(layers)} match no fast parameter; names are: {', '.join(fast_params)}")
        self.p, self.kind, self.schedule = p, kind, schedule
        self.progress = 1.0

    def set_training_progress(self, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)

    @property
    def rate(self) -> float:
        return self.p * self.progress if self.schedule == "linear" else self.p

    def noise_like(self, g: Tensor, p: float) -> Tensor:
        return dropout_noise(g.shape, p, self.kind, g)

    def update(self, grads: Grads, state, step: int) -> tuple[Grads, None]:
        p = self.rate
        if not self.training or p == 0.0:
            return grads, state
        return {n: g * self.noise_like(g, p) if n in self.names else g for n, g in grads.items()}, state

    def extra_repr(self) -> str:
        return f"p={self.p}, kind={self.kind}, schedule={self.schedule}, layers={len(self.names)} tensors"


register("dropgrad")(DropGrad)
