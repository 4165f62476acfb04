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
    """DropGrad (Eq. 4-6): each inner gradient element times ``Bernoulli(1 - p) / (1 - p)``
    (``kind="binary"``) or ``N(1, p / (1 - p))`` (``"gaussian"``) noise, fresh at every inner step,
    while meta-training only (in eval mode the gradients pass unchanged).

    Usually built by name inside an inner rule, as ``{"name": "dropgrad", **options}``; the
    learner passes ``fast_params`` and ``groups``.

    Args:
        fast_params: the fast weights (name -> tensor) the rule is built for.
        p: the drop rate; both noises have mean 1 and variance p / (1 - p).
        kind: ``binary`` (Eq. 5) or ``gaussian`` (Eq. 6).
        schedule: ``constant`` (the paper) or ``linear`` (p ramps up from 0 over meta-training; an
            extension).
        layers: the parameters it touches: glob patterns or the backbone's layer groups (``fc`` is
            ``head``, ``last-block+fc``, ``first-block``, ``full``).
        groups: the backbone's layer groups (given by the learner).

    Examples:
        ```python
        import torch
        import metareg

        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        dropgrad = {"name": "dropgrad", "kind": "binary", "p": 0.5, "layers": ["1.weight"]}
        learner = metareg.MAML(net, transforms=[dropgrad])
        dropgrad = learner.inner.transforms[0]
        grads = {"1.weight": torch.ones(3, 4), "1.bias": torch.ones(3)}
        noisy, _ = dropgrad.update(grads, None, step=0)
        assert set(noisy["1.weight"].unique().tolist()) <= {0.0, 2.0}   # dropped, or kept and scaled by 1 / (1 - p)
        assert torch.equal(noisy["1.bias"], grads["1.bias"])              # not selected: unchanged
        ```
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
