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

Some perturbations change the loss, not only the features: information-theoretic ones add a
weighted KL term, mixup interpolates the labels with the features. They write into the
:class:`PassRecord` of the training pass (:func:`recording`), and every scheme computes its
training loss with :func:`perturbed_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


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
    running_stats: bool = (
        False  # ordinary training (running statistics at test time) or episodic (batch statistics always)
    )
    layers: int | None = None  # how many hidden perturbable layers the network has (index < layers)
    before_pooling: bool = False  # the feature map is next reduced (a pooling or a stride-2 layer follows)


class FeaturePerturbation(nn.Module):
    """Base class: the identity. Subclasses override :meth:`forward`."""

    position: Literal["linear", "norm"] = "norm"
    is_perturbation = True

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:  # noqa: ARG002
        return pre


def required_input(layer_input: Tensor | None, who: str) -> Tensor:
    """``layer_input`` for a perturbation whose noise is a function of it (a slot called without it
    is an error, not a crash deep inside)."""
    if layer_input is None:
        raise ConfigError(f"{who} needs the layer's input: call it as perturb(pre, layer_input, sample=...)")
    return layer_input


PerturbationFactory = Callable[[LayerInfo], nn.Module]


def with_attributes(factory: PerturbationFactory, **attributes: Any) -> PerturbationFactory:
    """``factory`` carrying optional attributes, which their readers take with ``getattr`` and a
    default: ``shared`` (the one function its slots share), ``sample_at_test`` (predictions are
    Monte-Carlo averages over the noise), ``support_attack`` (applied to the support set of every
    inner step), ``vmap_safe`` (False: the loop strategy runs it)."""
    for name, value in attributes.items():
        setattr(factory, name, value)
    return factory


def identity_factory(layer: LayerInfo) -> nn.Module:  # noqa: ARG001
    return FeaturePerturbation()


def perturbation_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that belong to perturbations (phi), in ``named_parameters`` order."""
    owned = {id(p) for m in model.modules() if getattr(m, "is_perturbation", False) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in owned]


@dataclass
class PassRecord:
    """What the perturbations of one training pass add to its loss (:func:`recording`).

    ``penalty``: their weighted regularizers (VIB's and Information Dropout's KL terms), added to
    the loss; ``mix``: mixup's interpolation, per example, as ``(lam, partner)``: the loss becomes
    ``lam * loss(out, y) + (1 - lam) * loss(out, y[partner])``; ``choices``: draws that the slots of
    one factory share within the pass (Manifold Mixup's layer); ``metrics``: diagnostics a trainer
    may log (MetaPerturb's mean noise and scale per block), as tensors (no host synchronization).
    """

    penalty: Tensor | float = 0.0
    mix: tuple[Tensor, Tensor] | None = None
    choices: dict = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def add_penalty(self, value: Tensor) -> None:
        self.penalty = self.penalty + value


_RECORD: ContextVar[PassRecord | None] = ContextVar("metareg_pass_record", default=None)


@contextmanager
def recording() -> Iterator[PassRecord]:
    """A training pass whose perturbations may add penalties or mix labels: the scheme computes its
    loss with :func:`perturbed_loss`. Outside it (query passes, evaluation) nothing is recorded and
    the label-mixing perturbations leave the features alone."""
    record = PassRecord()
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def current_record() -> PassRecord | None:
    return _RECORD.get()


def perturbed_loss(loss: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Tensor, record: PassRecord) -> Tensor:
    """``loss(out, y)`` with the pass's mixed labels and penalties. Classification's cross-entropy
    of mixed one-hot labels is the mix of the two cross-entropies; regression mixes the targets."""
    if record.mix is None:
        value = loss(out, y)
    else:
        lam, partner = record.mix
        if y.is_floating_point():  # regression: the interpolated target
            shape = (-1,) + (1,) * (y.dim() - 1)
            value = loss(out, lam.view(shape) * y + (1 - lam.view(shape)) * y[partner])
        else:
            own = F.cross_entropy(out, y, reduction="none")
            other = F.cross_entropy(out, y[partner], reduction="none")
            value = (lam * own + (1 - lam) * other).mean()
    return value + record.penalty
