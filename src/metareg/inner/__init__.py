"""Inner update rules (axis 2): gradient transforms and their composition."""

from .base import Chain, GradientTransform, Grads, param_key

# Transforms register themselves on import.
from .dropgrad import DropGrad  # noqa: E402
from .mask import SubspaceMask  # noqa: E402
from .registry import available, build_inner_rule, register
from .steps import SGD, MetaSGD, PerStepSGD

__all__ = [
    "SGD",
    "DropGrad",
    "SubspaceMask",
    "Chain",
    "GradientTransform",
    "Grads",
    "MetaSGD",
    "PerStepSGD",
    "available",
    "build_inner_rule",
    "param_key",
    "register",
]
