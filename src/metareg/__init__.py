"""metareg: meta-learned regularization on one PyTorch engine.

The public API, flat (everything a user needs is imported from ``metareg`` itself):

* learners (the bilevel scheme around any ``nn.Module`` and loss): :class:`MAML`, :class:`MetaSGD`,
  :class:`BilevelLearner` with an :class:`InnerRule`; :class:`JointLearner` (MetaPerturb's joint scheme);
* models and perturbations: :func:`create_model` / :func:`list_models` (the backbones, each with
  perturbation slots), :func:`build_perturbation` / :func:`list_perturbations`, :func:`attach` and
  :func:`attach_metaperturb` (a perturbation in a network of your own), :func:`load_phi`;
* inner-loop transforms: :class:`DropGrad`, :class:`SubspaceMask` (MT-net), by name in an
  :class:`InnerRule`;
* evaluation: :func:`evaluate` (episodes with 95% confidence intervals), :func:`mean_ci`,
  :func:`paired_difference`;
* trained models: :func:`load` (a run folder or ``"builtin:NAME"``) -> :class:`FewShotModel` with
  ``adapt(support_x, support_y).predict(query_x)``;
* configs: :class:`Config`, :func:`build_learner`, :func:`build_source` (what ``metareg train`` builds).

Example::

    import torch, metareg

    net = torch.nn.Sequential(...)                     # your own CNN
    net = metareg.attach(net, metareg.build_perturbation("meta-dropout"), at=["0", "4"], input_shape=(1, 28, 28),
                         running_stats=False)
    learner = metareg.MAML(net, lr=0.4, steps=5, transforms=[{"name": "dropgrad", "p": 0.1}])
    learner.meta_backward(batch)                        # second-order meta-gradient into .grad
"""

from .build import build_learner, build_source
from .config import Config
from .data.tasks import TaskBatch
from .evaluate import EvalResult, evaluate, mean_ci, paired_difference
from .fewshot import Classifier, FewShotModel, Predictor, load
from .inner import DropGrad, InnerRule, SubspaceMask
from .meta import MAML, BilevelLearner, MetaSGD
from .meta.joint import JointLearner
from .nets import available as list_models
from .nets import create_model
from .perturb import attach, attach_metaperturb, build_perturbation, set_strength
from .perturb import available as list_perturbations
from .perturb.pretrained import load_phi

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "BilevelLearner",
    "Classifier",
    "Config",
    "DropGrad",
    "EvalResult",
    "FewShotModel",
    "InnerRule",
    "JointLearner",
    "MetaSGD",
    "Predictor",
    "SubspaceMask",
    "TaskBatch",
    "__version__",
    "attach",
    "attach_metaperturb",
    "build_learner",
    "build_perturbation",
    "build_source",
    "create_model",
    "evaluate",
    "list_models",
    "list_perturbations",
    "load",
    "load_phi",
    "mean_ci",
    "paired_difference",
    "set_strength",
]
