"""Feature perturbations (axis 1), one file per method and one registration each: Meta-Dropout and
the ablations of its Table 3, the fixed-rate dropout baselines, MetaPerturb. They fill the slots of
every backbone (``metareg.nets.slots``) in every scheme; :func:`attach` puts any of them into a
network of your own with hooks."""

from . import dropout, meta_dropout, pretrained, weight_gaussian  # noqa: F401  (registers them)
from .attach import Perturbed, attach, attach_metaperturb, set_strength
from .dropout import Dropout
from .meta_dropout import AdditiveGaussianOutput, MultiplicativeNoise, multiplicative_noise
from .metaperturb import EquivariantConv, MetaPerturb, MetaPerturbFunction, metaperturb_slots
from .registry import available, build_perturbation, register
from .weight_gaussian import WeightGaussian

__all__ = [
    "AdditiveGaussianOutput",
    "Dropout",
    "EquivariantConv",
    "MetaPerturb",
    "MetaPerturbFunction",
    "MultiplicativeNoise",
    "Perturbed",
    "WeightGaussian",
    "attach",
    "attach_metaperturb",
    "available",
    "build_perturbation",
    "metaperturb_slots",
    "multiplicative_noise",
    "register",
    "set_strength",
]
