"""Feature perturbations (axis 1): identity by default; Meta-Dropout, MetaPerturb and baselines."""

from .base import FeaturePerturbation, LayerInfo, PerturbationFactory, identity_factory
from .registry import available, build_perturbation, register

__all__ = [
    "FeaturePerturbation",
    "LayerInfo",
    "PerturbationFactory",
    "available",
    "build_perturbation",
    "identity_factory",
    "register",
]
