"""The feature-perturbation slot every backbone offers (axis 1 of the design).

A backbone asks a :class:`PerturbationFactory` for one module per perturbable layer, passing a
:class:`LayerInfo`: every hidden layer (a conv block, a residual block, a dense layer), and the
output layer (``LayerInfo.output``), for which most factories return the identity. The module is
called as ``perturb(pre, layer_input, sample=...)`` where ``pre`` is the layer's pre-activation,
``layer_input`` is the input that produced it (Meta-Dropout's noise is a function of the lower
layer's features) and ``sample`` says whether to draw noise (support set, training) or use the
deterministic mean (query set).

Where ``pre`` is taken is the module's ``position``: ``"linear"``, the output of the layer's
convolution or matrix product, before batch norm (Meta-Dropout's reference placement), or
``"norm"``, after batch norm. The nonlinearity always comes after. In a residual block ``pre`` is
the residual sum (MetaPerturb's Figure 3), whatever the position.

A factory may hand out a new module per layer (Meta-Dropout's per-layer noise generators) or
slots that share one function (MetaPerturb's 82-parameter phi, one running-statistics slot per
layer). A shared function is the factory's ``shared`` attribute; :func:`metareg.nets.create_model`
registers it on the network as ``perturbation_function``, so its parameters appear once.
Perturbation modules (and shared functions) set ``is_perturbation = True``: their parameters have
the *perturbation* role (never adapted in an inner loop, shared by a joint scheme's networks), see
:func:`perturbation_parameter_names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor, nn


@dataclass(frozen=True)
class LayerInfo:
    """What a perturbation may need to know about the layer it sits at (and its network)."""

    index: int  # 0-based position among the backbone's perturbable layers
    kind: Literal["conv", "dense"]
    in_features: int  # input channels (conv) or input width (dense)
    out_features: int  # output channels (conv) or output width (dense)
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    output: bool = False  # the network's last (classifier / regressor) layer
    size: int | None = None  # the feature map's height at the slot (conv layers)
    network_width: int | None = None  # the widest perturbed conv layer of the network (MetaPerturb's C normalizer)
    input_size: int | None = None  # the network's input height (MetaPerturb's H normalizer)
    running_stats: bool = False  # ordinary training (running statistics at test time) or episodic (batch statistics always)


class FeaturePerturbation(nn.Module):
    """Base class: the identity. Subclasses override :meth:`forward`."""

    position: Literal["linear", "norm"] = "norm"
    is_perturbation = True

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:  # noqa: ARG002
        return pre


PerturbationFactory = Callable[[LayerInfo], nn.Module]


def identity_factory(layer: LayerInfo) -> nn.Module:  # noqa: ARG001
    return FeaturePerturbation()


def perturbation_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that belong to perturbations (phi), in ``named_parameters`` order."""
    owned = {id(p) for m in model.modules() if getattr(m, "is_perturbation", False) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in owned]
