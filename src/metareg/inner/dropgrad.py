"""DropGrad (Tseng et al. 2020, Eq. 4-6): dropout on the inner-loop gradients.

    g' = g o n,   binary:   n ~ Bernoulli(1 - p) / (1 - p)          (Eq. 5)
                  Gaussian: n ~ N(1, p / (1 - p))                   (Eq. 6)

Both noises have mean 1 and variance p / (1 - p). A fresh n is drawn for every gradient element at
every inner step, during meta-training only (Algorithm 1); meta-testing adapts with the plain
gradient. ``layers`` chooses what it touches (:mod:`metareg.selection`): glob patterns over
parameter names, or the backbone's layer groups: the paper's Table 2 compares ``fc`` (the
classifier, the group ``head``), ``last-block+fc``, ``full`` and the input side ``first-block``.

``schedule="linear"`` ramps p from 0 to its value over meta-training (an extension, not in the
paper; the default is the paper's constant rate). The trainer reports its progress through
``set_training_progress``.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..errors import ConfigError
from ..noise import check_dropout, dropout_noise
from ..selection import select
from .base import GradientTransform, Grads
from .registry import register

# The paper's names for two of the backbones' groups.
PAPER_GROUPS = {"fc": "head", "last-block+fc": "last-block+head"}


class DropGrad(GradientTransform):
    """DropGrad: each inner gradient element times ``Bernoulli(1 - p) / (1 - p)`` (``kind="binary"``)
    or ``N(1, p / (1 - p))`` (``"gaussian"``) noise, fresh at every inner step, while meta-training
    only; ``layers`` selects the parameters (patterns or layer groups such as ``fc``).

    Example: ``metareg.MAML(net, transforms=[{"name": "dropgrad", "kind": "gaussian", "p": 0.1}])``.
    """

    def __init__(
        self,
        fast_params: dict[str, Tensor],
        p: float = 0.1,
        kind: Literal["binary", "gaussian"] = "gaussian",
        schedule: Literal["constant", "linear"] = "constant",
        layers: str | list[str] | tuple[str, ...] = ("*",),
        groups: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        check_dropout("DropGrad", p, kind)
        if schedule not in ("constant", "linear"):
            raise ConfigError(f"DropGrad schedule must be constant or linear, got {schedule!r}")
        layers = [PAPER_GROUPS.get(item, item) for item in ([layers] if isinstance(layers, str) else layers)]
        self.fast_names = tuple(fast_params)
        self.names = select(list(fast_params), layers, groups, what="fast parameter", role="DropGrad layer")
        self.p, self.kind, self.schedule = p, kind, schedule
        self.progress = 1.0

    def set_training_progress(self, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)

    @property
    def scheduled(self) -> bool:
        return self.schedule == "linear"

    @property
    def rate(self) -> float:
        return self.p * self.progress if self.schedule == "linear" else self.p

    def noise_like(self, g: Tensor, p: float) -> Tensor:
        return dropout_noise(g.shape, p, self.kind, g)

    def update(self, grads: Grads, state, step: int) -> tuple[Grads, None]:  # noqa: ARG002 (the protocol)
        p = self.rate
        if not self.training or p == 0.0:
            return grads, state
        return {n: g * self.noise_like(g, p) if n in self.names else g for n, g in grads.items()}, state

    def extra_repr(self) -> str:
        return f"p={self.p}, kind={self.kind}, schedule={self.schedule}, layers={len(self.names)} tensors"


register("dropgrad")(DropGrad)
