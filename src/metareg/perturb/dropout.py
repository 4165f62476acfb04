"""Fixed-rate dropout on features, the classic regularizers Meta-Dropout is set against
(DESIGN's baseline list): nothing is meta-learned.

``dropout``: every activation is multiplied by Bernoulli(1-p)/(1-p) (``kind="binary"``) or
N(1, p/(1-p)) (``kind="gaussian"``, Gaussian dropout); ``spatial-dropout``: the same noise drawn
once per example and channel (a whole feature map is kept or dropped). Applied where the inner
loop samples (the support set); the query set and meta-testing's query pass see the features
untouched, as for every perturbation here. The slot sits after batch norm and before the ReLU and
max-pool: dropout commutes with the ReLU (the noise is non-negative for the binary kind), so this
is dropout on the block's activations before pooling. Hidden layers only.

``during="training"``: the ordinary ``nn.Dropout`` behaviour instead, on every pass while the model
is in training mode (the support *and* query passes of meta-training, so on the activations of both
f_theta and the adapted f_theta') and never at meta-test (eval mode): DropGrad's Table 4 baseline,
"Dropout on the network activations in both f_theta and f_theta'", with rate 0.3.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.slots import FeaturePerturbation, LayerInfo, PerturbationFactory
from ..noise import check_dropout, dropout_noise
from .registry import register


class Dropout(FeaturePerturbation):
    position = "norm"

    def __init__(
        self,
        p: float = 0.1,
        kind: Literal["binary", "gaussian"] = "binary",
        spatial: bool = False,
        during: Literal["sampling", "training"] = "sampling",
    ):
        super().__init__()
        check_dropout("dropout", p, kind)
        if during not in ("sampling", "training"):
            raise ConfigError(f"dropout during must be sampling or training, got {during!r}")
        self.p, self.kind, self.spatial, self.during = p, kind, spatial, during

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:  # noqa: ARG002
        active = sample if self.during == "sampling" else self.training
        if not active or self.p == 0.0:
            return pre
        shape = pre.shape[:2] + (1,) * (pre.dim() - 2) if self.spatial else pre.shape
        return pre * dropout_noise(shape, self.p, self.kind, pre)

    def extra_repr(self) -> str:
        return f"p={self.p}, kind={self.kind}, spatial={self.spatial}, during={self.during}"


def _factory(
    p: float, kind: Literal["binary", "gaussian"], spatial: bool, during: Literal["sampling", "training"]
) -> PerturbationFactory:
    Dropout(p, kind, spatial, during)  # check the options once, where they are given

    def make(info: LayerInfo) -> nn.Module:
        return FeaturePerturbation() if info.output else Dropout(p, kind, spatial, during)

    return make


register("dropout")(lambda p=0.1, kind="binary", during="sampling": _factory(p, kind, False, during))
register("spatial-dropout")(lambda p=0.1, kind="binary", during="sampling": _factory(p, kind, True, during))
