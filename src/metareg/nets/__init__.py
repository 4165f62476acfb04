"""Backbones (a registry: ``create_model(name, ...)``), their layers and the perturbation slot they offer."""

from . import conv, mlp, resnet, resnet12  # noqa: F401  (register the backbones)
from .conv import ConvBlock, ConvNet
from .layers import BatchNorm
from .mlp import MLP
from .registry import Backbone, available, create_model, get_backbone, register_backbone
from .resnet import ResNet, WideResNet
from .resnet12 import ResNet12
from .slots import (
    FeaturePerturbation,
    LayerInfo,
    PerturbationFactory,
    identity_factory,
    perturbation_parameter_names,
)

__all__ = [
    "MLP",
    "Backbone",
    "BatchNorm",
    "ConvBlock",
    "ConvNet",
    "FeaturePerturbation",
    "LayerInfo",
    "PerturbationFactory",
    "ResNet",
    "ResNet12",
    "WideResNet",
    "available",
    "create_model",
    "get_backbone",
    "identity_factory",
    "perturbation_parameter_names",
    "register_backbone",
]
