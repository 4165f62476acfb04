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
    """The names of the registered perturbations, sorted.

    Returns:
        The names :func:`build_perturbation` takes (``meta-dropout``, ``metaperturb``, ``none``, ...).

    Examples:
        ```python
        import metareg

        print(metareg.list_perturbations())
        ```
    """
    return sorted(_REGISTRY)


def build_perturbation(name: str, options: dict[str, Any] | None = None) -> PerturbationFactory:
    """The slot factory of a registered perturbation: a function ``LayerInfo -> nn.Module`` that
    every backbone's slots and :func:`metareg.attach` call, once per perturbed layer.

    Args:
        name: one of :func:`list_perturbations`: ``none``, ``meta-dropout`` and its Table 3
            ablations (``fixed-gaussian``, ``independent-gaussian``, ``weight-gaussian``,
            ``meta-dropout-deterministic``, ``meta-dropout-learned-variance``), ``metaperturb``,
            the baselines (``mixup``, ``manifold-mixup``, ``vib``, ``information-dropout``,
            ``adversarial``, ``dropblock``, ``dropout``, ``spatial-dropout``), ...
        options: the perturbation's keyword arguments (e.g. ``{"phi": "builtin"}`` for
            ``metaperturb``, ``{"p": 0.1}`` for ``dropout``).

    Returns:
        The factory. A factory whose slots share one function (MetaPerturb's phi) holds it in
        ``factory.shared``.

    Raises:
        metareg.errors.ConfigError: an unknown name or options it does not take (one line).

    Examples:
        ```python
        import metareg

        factory = metareg.build_perturbation("meta-dropout")
        model = metareg.create_model("conv4", 5, in_channels=1, image_size=28, perturbation=factory)
        print(model.perturbation_points)
        ```
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown perturbation {name!r}; available: {', '.join(available())}")
    check_options(_REGISTRY[name], options or {}, f"perturbation {name!r}")
    try:
        return _REGISTRY[name](**(options or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad options for perturbation {name!r}: {one_line(err)}") from None


__all__ = ["LayerInfo", "available", "build_perturbation", "register"]
