"""From a :class:`~metareg.config.Config` to the objects it describes."""

from __future__ import annotations

import torch

from .config import Config
from .data import build_task_source
from .data.tasks import TaskSource
from .errors import ConfigError
from .inner import build_inner_rule
from .meta import BilevelLearner, select_fast
from .nets import create_model
from .perturb import build_perturbation

# (input channels, default image size) of each data set; regression takes 1 input feature.
INPUTS = {"glyphs": (1, 28), "omniglot": (1, 28), "miniimagenet": (3, 84), "sine": (1, None), "polynomial": (1, None)}


def is_regression(config: Config) -> bool:
    return config.data.name in ("sine", "polynomial")


def build_source(config: Config, split: str, *, shot: int | None = None) -> TaskSource:
    """The task source of ``split``; ``shot`` overrides the configured shots (meta-test at K)."""
    data = config.data
    return build_task_source(
        data.name,
        split,
        way=data.way,
        shot=shot or data.shot,
        query=data.query,
        root=data.root,
        image_size=data.image_size,
        **data.options,
    )


def build_learner(config: Config) -> BilevelLearner:
    if config.data.name not in INPUTS:
        raise ConfigError(f"unknown data set {config.data.name!r}")
    channels, default_size = INPUTS[config.data.name]
    regression = is_regression(config)
    model = create_model(
        config.model.backbone,
        1 if regression else config.data.way,
        in_channels=channels,
        image_size=config.data.image_size or default_size or 1,
        perturbation=build_perturbation(config.model.perturbation, config.model.perturbation_options),
        **config.model.options,
    )
    params = dict(model.named_parameters())
    fast = {n: params[n] for n in select_fast(list(params), config.inner.fast)}
    inner = build_inner_rule(fast, step=config.inner.step, lr=config.inner.lr, steps=config.inner.steps, transforms=config.inner.transforms)
    return BilevelLearner(
        model,
        inner,
        task="regression" if regression else "classification",
        inner_steps=config.inner.steps,
        eval_inner_steps=config.inner.eval_steps,
        first_order=config.inner.first_order,
        fast=config.inner.fast,
        mc_samples=config.inner.mc_samples,
        eval_mc_samples=config.inner.eval_mc_samples,
        strategy=resolve_strategy(config),
    )


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


def resolve_strategy(config: Config) -> str:
    """``auto``: ``vmap`` on CUDA and for the small MLP regressors (1.5x the loop's tasks/s on the
    sine preset on CPU, where per-task Python overhead dominates); the per-task loop for conv nets
    on CPU (``metareg bench``: the loop is 1.5x faster than ``vmap`` there, with 1/5 the memory)."""
    if config.train.strategy != "auto":
        return config.train.strategy
    if resolve_device(config.device).type == "cuda" or config.model.backbone == "mlp":
        return "vmap"
    return "loop"


def dtype_of(config: Config) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[config.dtype]
