"""Backbones. ``create_model(name, ...)`` builds any of them with consistent arguments."""

from .conv import ConvBlock, ConvNet
from .factory import STANDARD_OPTIONS, available, create_model
from .layers import BatchNorm
from .mlp import MLP
from .resnet import ResNet, WideResNet

__all__ = ["MLP", "STANDARD_OPTIONS", "BatchNorm", "ConvBlock", "ConvNet", "ResNet", "WideResNet", "available", "create_model"]
