"""One way to create every backbone: ``create_model(name, num_outputs, ...)`` (a registry like timm's).

A backbone module registers each of its variants with :func:`register_backbone`: a constructor
``make(num_outputs, in_channels, image_size, perturbation, **options)`` and the options that turn it
into its *ordinarily trained* form (``standard``: batch norm with running statistics, He init for
the episodic conv nets; nothing for the ResNets, which are always that). A new backbone is one file
plus its registrations. Every backbone takes a perturbation factory that fills a slot in each of
its blocks (``metareg.nets.slots``), names its blocks' slots in ``perturbation_points`` (where
:func:`metareg.perturb.attach` can hook in instead) and its layer groups in ``layer_groups()``
(``head``, ``first-block``, ``last-block``: for :mod:`metareg.selection`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError, one_line
from ..options import check_options
from .slots import PerturbationFactory, identity_factory


@dataclass(frozen=True)
class Backbone:
    name: str
    make: Callable[..., nn.Module]
    standard: dict[str, Any] = field(default_factory=dict)  # options of its ordinarily trained form
    description: str = ""


_BACKBONES: dict[str, Backbone] = {}
#: The parameters of a backbone's constructor that :func:`create_model` fills (never options); a
#: ``make`` whose options are its class's sets ``make.__wrapped__ = cls``, so that they are checked
#: against the class's signature (:func:`metareg.options.check_options`).
BUILDER_FILLS = (
    *("num_classes", "num_outputs", "in_channels", "image_size", "perturbation"),
    *("in_features", "out_features"),  # the MLP's
)


def register_backbone(
    name: str, make: Callable[..., nn.Module], *, standard: dict[str, Any] | None = None, description: str = ""
) -> None:
    if name in _BACKBONES:
        raise ValueError(f"backbone {name!r} registered twice")
    _BACKBONES[name] = Backbone(name, make, dict(standard or {}), description)


def available() -> list[str]:
    """The names of the registered backbones, sorted.

    Returns:
        The names :func:`create_model` takes (``conv4``, ``resnet20``, ...).

    Examples:
        ```python
        import metareg

        print(metareg.list_models())
        ```
    """
    return sorted(_BACKBONES)


def get_backbone(name: str) -> Backbone:
    if name not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available())}")
    return _BACKBONES[name]


def create_model(
    name: str,
    num_outputs: int,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    perturbation: PerturbationFactory = identity_factory,
    standard: bool = False,
    **options: Any,
) -> nn.Module:
    """Build a backbone with a perturbation in its slots (every conv or residual block and the
    output layer has one).

    Args:
        name: one of :func:`list_models` (``conv4``, ``conv6``, ``vgg9``, ``mlp``,
            ``resnet20/32/44/56``, ``resnet18``, ``wrn-28-2``).
        num_outputs: classes (or regression outputs).
        in_channels: image channels.
        image_size: image side in pixels.
        perturbation: a factory from :func:`build_perturbation` (default: none).
        standard: the ordinarily trained form (running batch-norm statistics, He init) instead
            of the episodic one; options given still win.
        **options: the backbone's own: ``channels``, ``strided``, ``pool``, ``running_stats``,
            ``init`` for the conv nets; ``hidden`` for the MLP; ``blocks``, ``widths``, ``stem``,
            ``shortcut`` for the ResNets; ``depth``, ``widen`` for the WRN.

    Returns:
        The network: ``forward(x, sample=...)``, ``layer_groups()`` (``first-block``,
        ``last-block``, ``head``) and ``perturbation_points`` (for :func:`attach`).

    Raises:
        metareg.errors.ConfigError: an unknown backbone or options it does not take (one line).

    Examples:
        ```python
        import torch
        import metareg

        net = metareg.create_model("conv4", 5, in_channels=1, image_size=28, channels=32,
                                   perturbation=metareg.build_perturbation("meta-dropout"))
        print(net(torch.rand(2, 1, 28, 28), sample=True).shape)   # [2, 5]
        ```
    """
    backbone = get_backbone(name)
    check_options(backbone.make, options, f"backbone {name!r}", fixed=BUILDER_FILLS)
    options = (backbone.standard if standard else {}) | options
    if "hidden" in options:
        options["hidden"] = tuple(options["hidden"])
    try:
        model = backbone.make(num_outputs, in_channels, image_size, perturbation, **options)
    except NotImplementedError:  # an operation the device (torch's meta device, say) lacks: not the options
        raise
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a negative width, say
        raise ConfigError(f"bad options for backbone {name!r}: {one_line(err)}") from None
    shared = getattr(perturbation, "shared", None)
    if shared is not None:  # one function shared by every slot (MetaPerturb's phi): owned by the network
        model.perturbation_function = shared
    attack = getattr(perturbation, "support_attack", None)
    if attack is not None:  # inner-loop adversarial training: the bilevel scheme attacks the support set
        model.support_attack = attack
    return model
