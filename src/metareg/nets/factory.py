"""One way to create every backbone: ``create_model(name, num_outputs, ...)``.

Episodic backbones (``conv4``, ``conv6``, ``mlp``) take a perturbation factory that fills a slot in
every layer (Meta-Dropout and the other slot perturbations). Every convolutional backbone also
names its ``perturbation_points`` (block outputs), where :func:`metareg.perturb.attach_metaperturb`
hooks MetaPerturb in; the residual networks take perturbations only that way. For ordinary
(non-episodic) training, :data:`STANDARD_OPTIONS` holds the options that turn the episodic conv nets
into their ordinarily trained form (batch norm with running statistics, He initialization).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from ..perturb.base import PerturbationFactory, identity_factory
from .conv import ConvNet
from .mlp import MLP
from .resnet import ResNet, WideResNet

VGG9_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
VGG9_POOLS = (1, 1, 0, 1, 0, 1, 0, 1)
CONV6_POOLS = (1, 1, 0, 1, 0, 1)  # four poolings, as in the MetaPerturb reference's Conv6


def _convnet(**defaults: Any) -> Callable[..., nn.Module]:
    def make(num_outputs, in_channels, image_size, perturbation, **kw):
        return ConvNet(num_outputs, in_channels, image_size, perturbation=perturbation, **(defaults | kw))
    return make


def _hooked(cls: type, **defaults: Any) -> Callable[..., nn.Module]:
    """A backbone that takes perturbations only through ``attach_metaperturb`` hooks."""
    def make(num_outputs, in_channels, image_size, perturbation, **kw):
        if perturbation is not identity_factory:
            raise ValueError(f"{cls.__name__} takes feature perturbations through metareg.perturb.attach_metaperturb, not a slot factory")
        return cls(num_outputs, in_channels, image_size, **(defaults | kw))
    return make


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "conv4": _convnet(depth=4),
    "conv6": _convnet(depth=6, pool=CONV6_POOLS),
    "vgg9": _convnet(channels=VGG9_WIDTHS, pool=VGG9_POOLS),
    "mlp": lambda num_outputs, in_channels, image_size, perturbation, **kw: MLP(in_channels, num_outputs, perturbation=perturbation, **kw),
    "resnet20": _hooked(ResNet, blocks=(3, 3, 3)),
    "resnet32": _hooked(ResNet, blocks=(5, 5, 5)),
    "resnet44": _hooked(ResNet, blocks=(7, 7, 7)),
    "resnet56": _hooked(ResNet, blocks=(9, 9, 9)),
    "resnet18": _hooked(ResNet, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet", shortcut="conv"),
    "wrn-28-2": _hooked(WideResNet, depth=28, widen=2),
}

# Ordinary training of the conv nets: batch norm with running statistics, He-normal convolutions.
STANDARD_OPTIONS: dict[str, dict[str, Any]] = {name: {"running_stats": True, "init": "kaiming"} for name in ("conv4", "conv6", "vgg9")}


def available() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    num_outputs: int,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    perturbation: PerturbationFactory = identity_factory,
    **options: Any,
) -> nn.Module:
    """Build backbone ``name``. ``options`` go to its constructor (``channels``, ``strided``,
    ``pool``, ``running_stats``, ``init`` for the conv nets; ``hidden`` for the MLP; ``blocks``,
    ``widths``, ``stem``, ``shortcut`` for the ResNets; ``depth``, ``widen`` for the WRN)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available())}")
    if "hidden" in options:
        options["hidden"] = tuple(options["hidden"])
    try:
        return _MODELS[name](num_outputs, in_channels, image_size, perturbation, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad options for backbone {name!r}: {err}") from None
