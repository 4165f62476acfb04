"""Input Mixup (Zhang et al. 2018) and Manifold Mixup (Verma et al. 2019) in the perturbation slot:
the baselines of Meta-Dropout's Table 2 (applied in MAML's inner steps) and of ordinary training.

Mixup trains on convex combinations of pairs of examples and of their labels:

    x~ = lam x_i + (1 - lam) x_j,   y~ = lam y_i + (1 - lam) y_j,   lam ~ Beta(gamma, gamma)

Manifold Mixup does the same with the hidden features h^(k) of a layer k drawn at random for every
training pass (k = 0, the input, is Input Mixup).

In the slot: the slot of layer k sits at ``position = "linear"``, on the output of the layer's
convolution or matrix product, which is linear in the layer's input. So mixing that output mixes
the layer's input exactly (``conv(lam a + (1 - lam) b) = lam conv(a) + (1 - lam) conv(b)`` when the
weights are shared and lam + (1 - lam) = 1): the first block's slot mixes the images (Input
Mixup), block k's slot mixes h^(k) (the previous block's output), the classifier's slot mixes the
last hidden features. Every pass draws lam, the partner j of each example (a permutation) and,
for Manifold Mixup, the layer; the labels are mixed through the pass's record
(:func:`metareg.nets.slots.perturbed_loss`). Outside a recorded training pass (query sets,
evaluation) nothing is mixed. With stacked copies (batched Monte-Carlo samples) each copy draws its
own lam, partners and layer, as S separate passes would.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.layers import copies
from ..nets.slots import (
    FeaturePerturbation,
    LayerInfo,
    PerturbationFactory,
    current_record,
    with_attributes,
)
from .registry import register


def beta_sample(gamma: float, count: int, like: Tensor) -> Tensor:
    """``count`` draws of Beta(gamma, gamma) (as X / (X + Y) of two Gamma(gamma) draws), on ``like``'s device."""
    shape = torch.full((2, count), gamma, dtype=like.dtype, device=like.device)
    x, y = torch._standard_gamma(shape)
    return x / (x + y)


class MixupPlan:
    """The draws one training pass shares among its slots: lam and partner per example, the layer per copy."""

    def __init__(self, gamma: float, manifold: bool):
        if not gamma > 0:
            raise ConfigError(f"mixup gamma must be > 0, got {gamma}")
        self.gamma, self.manifold, self.layers = gamma, manifold, 0

    def draw(self, pre: Tensor) -> dict[str, Tensor]:
        count = copies()
        n = pre.shape[0] // count
        lam = beta_sample(self.gamma, count, pre)
        partner = torch.cat([torch.randperm(n, device=pre.device) + s * n for s in range(count)])
        layer = (
            torch.randint(0, self.layers, (count,), device=pre.device)
            if self.manifold
            else torch.zeros(count, dtype=torch.long, device=pre.device)
        )
        return {"lam": lam.repeat_interleave(n), "partner": partner, "layer": layer.repeat_interleave(n)}


class Mixup(FeaturePerturbation):
    """The slot of layer ``index``: mixes its input when this pass's draw chose it."""

    position = "linear"
    plan: MixupPlan  # a plain reference, set with object.__setattr__ (not a submodule)

    def __init__(self, plan: MixupPlan, index: int):
        super().__init__()
        object.__setattr__(self, "plan", plan)  # shared by the factory's slots, not a submodule
        self.index = index

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:  # noqa: ARG002
        record = current_record()
        if not sample or record is None:
            return pre
        draw = record.choices.get(id(self.plan))
        if draw is None:
            draw = record.choices[id(self.plan)] = self.plan.draw(pre)
            record.mix = (draw["lam"], draw["partner"])
        shape = (-1,) + (1,) * (pre.dim() - 1)
        lam = draw["lam"].to(pre.dtype).view(shape)
        mixed = lam * pre + (1 - lam) * pre[draw["partner"]]
        return torch.where((draw["layer"] == self.index).view(shape), mixed, pre)

    def extra_repr(self) -> str:
        return f"layer={self.index}, gamma={self.plan.gamma}, manifold={self.plan.manifold}"


def _factory(gamma: float, manifold: bool) -> PerturbationFactory:
    plan = MixupPlan(gamma, manifold)

    def make(info: LayerInfo) -> nn.Module:
        if not manifold and info.index > 0:
            return FeaturePerturbation()
        plan.layers = max(plan.layers, info.index + 1)
        return Mixup(plan, info.index)

    # random permutations are not batched by torch.func.vmap: the loop strategy runs it
    return with_attributes(make, vmap_safe=False)


register("mixup")(lambda gamma=1.0: _factory(gamma, manifold=False))
register("manifold-mixup")(lambda gamma=1.0: _factory(gamma, manifold=True))
