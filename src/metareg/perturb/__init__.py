"""Feature perturbations (axis 1), one file per method and one registration each: Meta-Dropout and
the ablations of its Table 3, the fixed-rate dropout baselines, MetaPerturb, and the baselines the
seeds compare against (Mixup and Manifold Mixup, VIB, Information Dropout, DropBlock, inner-loop
adversarial training; with the input attacks PGD / FGSM / EoT). They fill the slots of
every backbone (``metareg.nets.slots``) in every scheme; :func:`attach` puts any of them into a
network of your own with hooks."""

from . import (  # noqa: F401  (registers them)
    adversarial,
    dropblock,
    dropout,
    information,
    meta_dropout,
    mixup,
    pretrained,
    weight_gaussian,
)
from .adversarial import PGD, fgsm
from .attach import Perturbed, attach, attach_metaperturb, set_strength
from .dropblock import DropBlock
from .dropout import Dropout
from .information import InformationDropout, VariationalBottleneck
from .meta_dropout import (
    AdditiveGaussianOutput,
    MultiplicativeNoise,
    multiplicative_noise,
)
from .metaperturb import (
    EquivariantConv,
    MetaPerturb,
    MetaPerturbFunction,
    metaperturb_slots,
)
from .mixup import Mixup
from .registry import available, build_perturbation, register
from .weight_gaussian import WeightGaussian

__all__ = [
    "PGD",
    "AdditiveGaussianOutput",
    "DropBlock",
    "Dropout",
    "EquivariantConv",
    "InformationDropout",
    "MetaPerturb",
    "MetaPerturbFunction",
    "Mixup",
    "MultiplicativeNoise",
    "Perturbed",
    "VariationalBottleneck",
    "WeightGaussian",
    "attach",
    "attach_metaperturb",
    "available",
    "build_perturbation",
    "fgsm",
    "metaperturb_slots",
    "multiplicative_noise",
    "register",
    "set_strength",
]
