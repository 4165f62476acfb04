"""One way to create every backbone: ``create_model(name, num_outputs, ...)``."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from ..perturb.base import PerturbationFactory, identity_factory
from .conv import ConvNet
from .mlp import MLP

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "conv4": lambda num_outputs, in_channels, image_size, perturbation, **kw: ConvNet(
        num_outputs, in_channels, image_size, perturbation=perturbation, **({"depth": 4} | kw)
    ),
    "conv6": lambda num_outputs, in_channels, image_size, perturbation, **kw: ConvNet(
        num_outputs, in_channels, image_size, perturbation=perturbation, **({"depth": 6} | kw)
    ),
    "mlp": lambda num_outputs, in_channels, image_size, perturbation, **kw: MLP(
        in_channels, num_outputs, perturbation=perturbation, **kw
    ),
}


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
    """Build backbone ``name``. ``options`` go to its constructor (``channels``, ``strided``, ``hidden``)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available())}")
    if "hidden" in options:
        options["hidden"] = tuple(options["hidden"])
    try:
        return _MODELS[name](num_outputs, in_channels, image_size, perturbation, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad options for backbone {name!r}: {err}") from None
