"""Name -> gradient transform. A new inner-loop regularizer is one file plus one ``register`` call.

Factories are called as ``make(fast_params, inner_config_options...)`` and return a
``GradientTransform``. ``build_inner_rule`` chains the configured transforms and ends the chain with
the configured step (``sgd``, ``meta-sgd`` or ``per-step``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import ConfigError, one_line
from ..options import check_options
from .base import Chain, GradientTransform
from .steps import SGD, MetaSGD, PerStepSGD

TransformFactory = Callable[..., GradientTransform]
_TRANSFORMS: dict[str, TransformFactory] = {}


def register(name: str) -> Callable[[TransformFactory], TransformFactory]:
    def wrap(make: TransformFactory) -> TransformFactory:
        if name in _TRANSFORMS:
            raise ValueError(f"gradient transform {name!r} registered twice")
        _TRANSFORMS[name] = make
        return make

    return wrap


STEPS = {
    "sgd": lambda _params, lr, _steps: SGD(lr),
    "meta-sgd": lambda params, lr, _steps: MetaSGD(params, lr),
    "per-step": lambda params, lr, steps: PerStepSGD(params, lr, steps),
}


def available() -> list[str]:
    return sorted(_TRANSFORMS)


def build_inner_rule(
    fast_params: dict[str, Tensor],
    *,
    step: str,
    lr: float,
    steps: int,
    transforms: list[dict[str, Any]] | None = None,
    groups: dict[str, list[str]] | None = None,
) -> Chain:
    """``transforms`` is a list of ``{"name": ..., **options}`` applied before the step; ``groups``
    are the backbone's layer groups, for transforms that choose layers (:mod:`metareg.selection`)."""
    chain: list[GradientTransform] = []
    for spec in transforms or []:
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in _TRANSFORMS:
            raise ConfigError(f"unknown gradient transform {name!r}; available: {', '.join(available()) or 'none'}")
        check_options(_TRANSFORMS[name], spec, f"gradient transform {name!r}", fixed=("self", "fast_params", "groups"))
        try:
            chain.append(_TRANSFORMS[name](fast_params, groups=groups, **spec))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad options for gradient transform {name!r}: {one_line(err)}") from None
    if step not in STEPS:
        raise ConfigError(f"unknown inner step {step!r}; choose one of {', '.join(STEPS)}")
    chain.append(STEPS[step](fast_params, lr, steps))
    return Chain(*chain)


@dataclass(frozen=True)
class InnerRule:
    """An inner update rule not built yet: the step that turns gradients into updates, its step
    size and the gradient transforms applied before it. A :class:`~metareg.BilevelLearner` builds
    it for the fast weights it selects (one selection), with the inner step count and the
    backbone's layer groups.

    Args:
        step: ``sgd`` (MAML: ``-lr * g``), ``meta-sgd`` (a meta-learned step size per weight,
            starting at ``lr``) or ``per-step`` (MAML++'s meta-learned step size per inner step
            and parameter tensor).
        lr: the step size (the initial one for the learned steps).
        transforms: ``{"name": ..., **options}`` applied in order before the step: ``dropgrad``
            (:class:`~metareg.DropGrad`), ``subspace-mask`` (:class:`~metareg.SubspaceMask`).

    Examples:
        ```python
        import torch
        import metareg

        rule = metareg.InnerRule("meta-sgd", lr=0.01, transforms=[{"name": "dropgrad", "kind": "gaussian", "p": 0.1}])
        net = torch.nn.Linear(3, 2)
        learner = metareg.BilevelLearner(net, rule, inner_steps=1)   # built for net's fast weights
        print(learner.inner)
        ```
    """

    step: str = "sgd"
    lr: float = 0.4
    transforms: Sequence[Mapping[str, Any]] = field(default_factory=tuple)

    def build(self, fast_params: dict[str, Tensor], steps: int, groups: dict[str, list[str]] | None = None) -> Chain:
        """The chain of transforms for ``fast_params`` (names -> tensors) and ``steps`` inner steps."""
        return build_inner_rule(
            fast_params,
            step=self.step,
            lr=self.lr,
            steps=steps,
            transforms=[dict(t) for t in self.transforms],
            groups=groups,
        )
