"""Adversarial robustness at meta-test time (Meta-Dropout, Figure 5): the query images of each
episode are attacked against the model adapted to that episode's support set, on the deterministic
query path (a = mu) the scores are computed on, so the attack sees exactly the model it is scored
on. The attacks themselves (FGSM, PGD in L-infinity / L2 / L1 balls, EoT) are in
:mod:`metareg.perturb.adversarial`; images are in [0, 1], as the data sets deliver them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from torch import Tensor

from ..errors import ConfigError
from ..perturb.adversarial import PGD, Norm, fgsm

if TYPE_CHECKING:
    from ..meta import BilevelLearner

ATTACKS = ("fgsm", "pgd-linf", "pgd-l2", "pgd-l1")


def make_attack(name: str, epsilon: float, *, steps: int = 10, draws: int = 1) -> PGD:
    """An attack by its command-line name (``fgsm``, ``pgd-linf``, ``pgd-l2``, ``pgd-l1``)."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if name == "fgsm":
        return fgsm(epsilon, draws)
    return PGD(cast(Norm, name.removeprefix("pgd-")), epsilon, steps=steps, draws=draws)  # checked above


@dataclass(frozen=True)
class QueryAttack:
    """``attack`` on the query images of an adapted model: ``QueryAttack(a)(learner, params, x, y) -> x'``."""

    attack: PGD

    def __call__(self, learner: BilevelLearner, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        if learner.task != "classification":
            raise ConfigError("the attacks target classifiers; this is a regression run")
        return self.attack(lambda images: learner.loss(learner.query_forward(params, images), y), x)

    def describe(self) -> str:
        return self.attack.describe()


def FGSM(epsilon: float) -> QueryAttack:  # noqa: N802  (the attack's name)
    """FGSM (Goodfellow et al. 2015) on the query images: x' = clip(x + epsilon sign(grad_x L), 0, 1)."""
    return QueryAttack(fgsm(epsilon))
