"""Name -> perturbation factory. A new regularizer is one file plus one ``register`` call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, one_line
from ..nets.slots import LayerInfo, PerturbationFactory, identity_factory
from ..options import check_options

_REGISTRY: dict[str, Callable[..., PerturbationFactory]] = {}


def register(name: str) -> Callable:
    """Register ``make(**options) -> factory`` under ``name``."""

    def wrap(make: Callable[..., PerturbationFactory]) -> Callable[..., PerturbationFactory]:
        if name in _REGISTRY:
            raise ValueError(f"perturbation {name!r} registered twice")
        _REGISTRY[name] = make
        return make

    return wrap


register("none")(lambda: identity_factory)


def available() -> list[str]:
    """The names of the registered perturbations (``metareg.list_perturbations()``), sorted."""
    return sorted(_REGISTRY)


def build_perturbation(name: str, options: dict[str, Any] | None = None) -> PerturbationFactory:
    """The slot factory of perturbation ``name`` with ``options`` (its keyword arguments): a
    function ``LayerInfo -> nn.Module`` that every backbone's slots and :func:`metareg.attach` call.

    Example::

        factory = metareg.build_perturbation("meta-dropout")
        model = metareg.create_model("conv4", 5, in_channels=1, image_size=28, perturbation=factory)
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown perturbation {name!r}; available: {', '.join(available())}")
    check_options(_REGISTRY[name], options or {}, f"perturbation {name!r}")
    try:
        return _REGISTRY[name](**(options or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad options for perturbation {name!r}: {one_line(err)}") from None


__all__ = ["LayerInfo", "available", "build_perturbation", "register"]
