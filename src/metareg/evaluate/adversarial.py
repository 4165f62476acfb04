"""Adversarial robustness at meta-test time (Meta-Dropout, Figure 5): the query images of each
episode are attacked against the model adapted to that episode's support set.

FGSM (Goodfellow et al., 2015): x_adv = clip(x + epsilon * sign(grad_x L(f_theta*(x), y)), 0, 1),
one step, on the deterministic query path (a = mu), so the attack sees exactly the model it is
scored on. Images are in [0, 1], as the data sets deliver them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..meta import BilevelLearner


@dataclass(frozen=True)
class FGSM:
    epsilon: float

    def __post_init__(self):
        if not self.epsilon >= 0:
            raise ConfigError(f"FGSM epsilon must be >= 0, got {self.epsilon}")

    def __call__(self, learner: BilevelLearner, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        if learner.task != "classification":
            raise ConfigError("FGSM attacks classifiers; this is a regression run")
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = learner.loss(learner.query_forward(params, x), y)
            (grad,) = torch.autograd.grad(loss, x)
        return (x + self.epsilon * grad.sign()).clamp(0, 1).detach()

    def describe(self) -> str:
        return f"fgsm eps={self.epsilon:g}"
