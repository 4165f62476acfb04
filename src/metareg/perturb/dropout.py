"""Fixed-rate dropout on features, the classic regularizers Meta-Dropout is set against
(DESIGN's baseline list): nothing is meta-learned.

``dropout``: every activation is multiplied by Bernoulli(1-p)/(1-p) (``kind="binary"``) or
N(1, p/(1-p)) (``kind="gaussian"``, Gaussian dropout); ``spatial-dropout``: the same noise drawn
once per example and channel (a whole feature map is kept or dropped). Applied where the inner
loop samples (the support set); the query set and meta-testing's query pass see the features
untouched, as for every perturbation here. The slot sits after batch norm and before the ReLU and
max-pool: dropout commutes with the ReLU (the noise is non-negative for the binary kind), so this
is dropout on the block's activations before pooling. Hidden layers only.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ..nets.slots import FeaturePerturbation, LayerInfo, PerturbationFactory
from ..noise import check_dropout, dropout_noise
from .registry import register


class Dropout(FeaturePerturbation):
    position = "norm"

    def __init__(self, p: float = 0.1, kind: Literal["binary", "gaussian"] = "binary", spatial: bool = False):
        super().__init__()
        check_dropout("dropout", p, kind)
        self.p, self.kind, self.spatial = p, kind, spatial

    def forward(self, pre: Tensor, layer_input: Tensor, *, sample: bool) -> Tensor:  # noqa: ARG002
        if not sample or self.p == 0.0:
            return pre
        shape = pre.shape[:2] + (1,) * (pre.dim() - 2) if self.spatial else pre.shape
        return pre * dropout_noise(shape, self.p, self.kind, pre)

    def extra_repr(self) -> str:
        return f"p={self.p}, kind={self.kind}, spatial={self.spatial}"


def _factory(p: float, kind: Literal["binary", "gaussian"], spatial: bool) -> PerturbationFactory:
    def make(info: LayerInfo) -> nn.Module:
        return FeaturePerturbation() if info.output else Dropout(p, kind, spatial)

    return make


register("dropout")(lambda p=0.1, kind="binary": _factory(p, kind, spatial=False))
register("spatial-dropout")(lambda p=0.1, kind="binary": _factory(p, kind, spatial=True))
