"""The fully connected regressor of MAML's sine experiment (1-40-40-1, ReLU)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..perturb.base import LayerInfo, PerturbationFactory, identity_factory


class MLP(nn.Module):
    """Dense layers with ReLU between them and a perturbation slot before each ReLU."""

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: tuple[int, ...] = (40, 40),
        perturbation: PerturbationFactory = identity_factory,
    ):
        super().__init__()
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.perturbs = nn.ModuleList(
            perturbation(LayerInfo(i, "dense", a, b)) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
        )
        self.head = nn.Linear(widths[-1], out_features)

    def forward(self, x: Tensor, *, sample: bool = False) -> Tensor:
        for layer, perturb in zip(self.layers, self.perturbs):
            x = F.relu(perturb(layer(x), x, sample=sample))
        return self.head(x)
