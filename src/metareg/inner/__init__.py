"""Inner update rules (axis 2): gradient transforms and their composition."""

from .base import Chain, GradientTransform, Grads, param_key

# Transforms register themselves on import.
from .dropgrad import DropGrad
from .mask import SubspaceMask
from .registry import InnerRule, available, build_inner_rule, register
from .steps import SGD, MetaSGD, PerStepSGD

__all__ = [
    "SGD",
    "Chain",
    "DropGrad",
    "GradientTransform",
    "Grads",
    "InnerRule",
    "MetaSGD",
    "PerStepSGD",
    "SubspaceMask",
    "available",
    "build_inner_rule",
    "param_key",
    "register",
]
