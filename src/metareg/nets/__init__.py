"""Backbones. ``create_model(name, ...)`` builds any of them with consistent arguments."""

from .conv import ConvBlock, ConvNet
from .factory import available, create_model
from .layers import BatchNorm
from .mlp import MLP

__all__ = ["MLP", "BatchNorm", "ConvBlock", "ConvNet", "available", "create_model"]
