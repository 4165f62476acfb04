"""From configs to objects: the one place a config (:mod:`metareg.config`) becomes a device, a
dtype, an execution strategy, a network, a perturbation factory, a task source or a learner. The
command line and the Python API build through these functions, so a run and a user's script given
the same config get the same objects."""

from __future__ import annotations

from typing import Any

import torch

from .config import Config, PerturbConfig
from .data import build_task_source, get_episodic
from .data.tasks import TaskSource
from .errors import ConfigError
from .inner import InnerRule
from .meta.bilevel import BilevelLearner
from .nets import create_model
from .nets.layers import tracks_running_statistics
from .perturb import build_perturbation

# Ordinary training takes RGB; grayscale data is repeated over 3 channels (as MetaPerturb's reference does).
IMAGE_CHANNELS = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------- devices etc.
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available to this torch")
    return device


def dtype_of(config: Any) -> torch.dtype:
    return DTYPES[config.dtype]


def resolve_strategy(strategy: str, device: torch.device, backbone: str, vmap_safe: bool = True) -> str:
    """``auto``: ``vmap`` on CUDA and for the small MLP regressors (1.5x the loop's tasks/s on the
    sine preset on CPU, where per-task Python overhead dominates); the per-task loop for conv nets
    on CPU (``metareg bench``: the loop is 1.5x faster than ``vmap`` there, with 1/5 the memory),
    and for perturbations ``vmap`` cannot batch (``vmap_safe = False``: mixup's permutations,
    inner-loop attacks)."""
    if strategy != "auto":
        return strategy
    return "vmap" if (device.type == "cuda" or backbone == "mlp") and vmap_safe else "loop"


def resolve_mc_batch(choice: str, device: torch.device, model: torch.nn.Module) -> bool:  # noqa: ARG001
    """Whether the inner loop's Monte-Carlo samples run as one batched pass. ``auto``: batched
    whenever the model can stack copies (its batch norms are the episodic ones). Measured with
    ``metareg bench --mc 30`` on 2 CPU cores, Meta-Dropout's meta-test: 1.10-1.17x faster batched
    for 20-way Conv4-64, 2.1x for 5-way Conv4-32 (at twice the memory); on a GPU, where S small
    passes are bound by kernel launches, one large pass is expected to win by more (unmeasured)."""
    if choice == "auto":
        return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return choice == "batched"


def build_network(
    name: str, num_classes: int, image_size: int, options: dict[str, Any], perturbation: Any = None
) -> torch.nn.Module:
    """A backbone in its ordinary-training form (running batch-norm statistics, He init), RGB input."""
    extra = {} if perturbation is None else {"perturbation": perturbation}
    return create_model(
        name, num_classes, in_channels=IMAGE_CHANNELS, image_size=image_size, standard=True, **extra, **options
    )


def perturbation_factory(p: PerturbConfig, phi: str = "learned") -> Any:
    """The slot factory of a run's perturbation config (MetaPerturb with its phi, clip and annealing)."""
    if p.name == "metaperturb":
        return build_perturbation("metaperturb", {"phi": phi, "clip": p.clip, "anneal": p.anneal} | p.options)
    return build_perturbation(p.name, p.options)


def is_regression(config: Config) -> bool:
    return get_episodic(config.data.name).regression


def test_dataset(config: Config, split: str) -> str:
    """The data set ``split`` is drawn from: ``data.test_name`` for the test split of a cross-domain
    run (DropGrad Table 4: meta-train on miniImageNet, meta-test on CUB), else ``data.name``."""
    data = config.data
    return data.test_name if data.test_name and split == data.test_split else data.name


def build_source(config: Config, split: str, *, shot: int | None = None) -> TaskSource:
    """The task source of ``split``; ``shot`` overrides the configured shots (meta-test at K)."""
    data = config.data
    name = test_dataset(config, split)
    other = name != data.name
    return build_task_source(
        name,
        split,
        way=data.way,
        shot=shot or data.shot,
        query=data.query,
        root=data.test_root if other else data.root,
        image_size=data.image_size or (get_episodic(data.name).image_size if other else None),
        **({} if other else data.options),
    )


def model_options(config: Config) -> dict[str, Any]:
    """The backbone options of ``config``, with MAML++'s per-step batch norm sized to the inner
    steps (``norm_steps = inner.steps`` unless given)."""
    options = dict(config.model.options)
    if (options.get("per_step_weights") or options.get("per_step_stats")) and "norm_steps" not in options:
        options["norm_steps"] = config.inner.steps
    return options


def build_learner(config: Config) -> BilevelLearner:
    """The model with its perturbation slots, the inner rule and the bilevel scheme of ``config``."""
    dataset = get_episodic(config.data.name)
    perturbation = build_perturbation(config.perturb.name, config.perturb.options)
    model = create_model(
        config.model.backbone,
        1 if dataset.regression else config.data.way,
        in_channels=dataset.channels,
        image_size=config.data.image_size or dataset.image_size or 1,
        perturbation=perturbation,
        **model_options(config),
    )
    device = resolve_device(config.device)
    # in-place running statistics (MAML++'s BNRS) cannot run under vmap: the loop then
    vmap_safe = getattr(perturbation, "vmap_safe", True) and not tracks_running_statistics(model)
    return BilevelLearner(
        model,
        InnerRule(config.inner.step, config.inner.lr, tuple(config.inner.transforms)),
        task="regression" if dataset.regression else "classification",
        inner_steps=config.inner.steps,
        eval_inner_steps=config.inner.eval_steps,
        first_order=config.inner.first_order,
        fast=config.inner.fast,
        mc_samples=config.inner.mc_samples,
        eval_mc_samples=config.inner.eval_mc_samples,
        strategy=resolve_strategy(config.train.strategy, device, config.model.backbone, vmap_safe),
        mc_batch=resolve_mc_batch(config.inner.mc_batch, device, model),
        multi_step_epochs=config.inner.multi_step_epochs,
        multi_step_min=config.inner.multi_step_min,
        first_order_epochs=config.inner.first_order_epochs,
    )
