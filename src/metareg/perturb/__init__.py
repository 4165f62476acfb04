"""Feature perturbations (axis 1): identity by default; Meta-Dropout, its ablations, dropout baselines;
MetaPerturb, attached after chosen modules of any CNN."""

from . import dropout, meta_dropout, weight_gaussian  # noqa: F401  (registers them)
from .attach import Perturbed, attach, attach_metaperturb, set_strength
from .base import FeaturePerturbation, LayerInfo, PerturbationFactory, identity_factory
from .dropout import Dropout
from .meta_dropout import (
    AdditiveGaussianOutput,
    MultiplicativeNoise,
    multiplicative_noise,
)
from .metaperturb import EquivariantConv, MetaPerturb, MetaPerturbFunction
from .registry import available, build_perturbation, register
from .weight_gaussian import WeightGaussian

__all__ = [
    "AdditiveGaussianOutput",
    "EquivariantConv",
    "MetaPerturb",
    "MetaPerturbFunction",
    "Perturbed",
    "attach",
    "attach_metaperturb",
    "set_strength",
    "Dropout",
    "FeaturePerturbation",
    "LayerInfo",
    "MultiplicativeNoise",
    "PerturbationFactory",
    "WeightGaussian",
    "available",
    "build_perturbation",
    "identity_factory",
    "multiplicative_noise",
    "register",
]
