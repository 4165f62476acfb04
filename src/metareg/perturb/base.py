"""The feature-perturbation slot (axis 1 of the design).

A backbone asks a :class:`PerturbationFactory` for one module per perturbable layer, passing a
:class:`LayerInfo`: every hidden layer, and the output layer (``LayerInfo.output``), for which most
factories return the identity. The module is called as ``perturb(pre, layer_input, sample=...)``
where ``pre`` is the layer's pre-activation, ``layer_input`` is the input that produced it
(Meta-Dropout's noise is a function of the lower layer's features) and ``sample`` says whether to
draw noise (support set, inner loop) or use the deterministic mean (query set).

Where ``pre`` is taken is the module's ``position``: ``"linear"``, the output of the layer's
convolution or matrix product, before batch norm (Meta-Dropout's reference placement), or
``"norm"``, after batch norm. The nonlinearity always comes after. A factory may hand out one
shared module to every layer (MetaPerturb) or a new one per layer (Meta-Dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor, nn


@dataclass(frozen=True)
class LayerInfo:
    """What a perturbation may need to know about the layer it sits at."""

    index: int  # 0-based position among the backbone's layers
    kind: Literal["conv", "dense"]
    in_features: int  # input channels (conv) or input width (dense)
    out_features: int  # output channels (conv) or output width (dense)
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    output: bool = False  # the network's last (classifier / regressor) layer


class FeaturePerturbation(nn.Module):
    """Base class: the identity. Subclasses override :meth:`forward`."""

    position: Literal["linear", "norm"] = "norm"

    def forward(self, pre: Tensor, layer_input: Tensor, *, sample: bool) -> Tensor:  # noqa: ARG002
        return pre


PerturbationFactory = Callable[[LayerInfo], nn.Module]


def identity_factory(layer: LayerInfo) -> nn.Module:  # noqa: ARG001
    return FeaturePerturbation()
