"""A config checked before a run builds anything: what it would build, and the memory it implies.

:func:`metareg.config.validate` checks every number against its meaning; this module checks what
only building can tell, without building anything real:

* the network (with its perturbation and, for meta-learning, the inner rule) is built on torch's
  ``meta`` device, which has shapes but no memory: every factory checks its options against its
  signature (:mod:`metareg.options`) and its own ranges, so ``model.options={channels: -4}`` or a
  perturbation option of the wrong type is one line before the data set is even loaded;
* the memory the counts imply (:func:`metareg.memory.require`): the parameters with their
  gradients and Adam's two moments, one meta-batch of episodes, one batch of test episodes, the
  support set stacked once per batched Monte-Carlo sample, the per-episode scores, one training
  batch, the Monte-Carlo test predictions. Each is a lower bound, so what is refused could never
  have run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .build import IMAGE_CHANNELS, build_learner, build_network, perturbation_factory, resolve_device
from .config import Config, MetaTrainConfig, TransferConfig
from .data import get_episodic
from .errors import MetaregError
from .memory import require
from .perturb import build_perturbation

BYTES = {"float32": 4, "float64": 8}
PREDICTION_BATCH = 250  # images per pass of the Monte-Carlo test predictions (metareg.meta.ordinary.predict)


class _SkipInitialization(TorchFunctionMode):
    """In-place operations on meta tensors (``normal_``, ``kaiming_uniform_``, ``zero_``: weight
    initialization) do nothing: on the meta device they would only compute shapes that are already
    known, through torch's Python decompositions, whose first use imports torch's compiler stack
    (seconds of a command's start)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None and first.is_meta:
                return first
        return func(*args, **kwargs)


def meta_built(build: Callable[[], Any]) -> Any:
    """``build()`` on the meta device (shapes only, no memory, no initialization), or None where a
    layer cannot be built there (it is then checked when it is built for real)."""
    try:
        with _SkipInitialization(), torch.device("meta"):
            return build()
    except NotImplementedError:
        return None
    except MetaregError as err:  # (a layer that reads a value while it is built: not the config's fault)
        if "meta tensor" in str(err):
            return None
        raise


def check(config: Config | MetaTrainConfig | TransferConfig) -> None:
    """Refuse, in one line, a config whose network cannot be built or whose counts cannot fit in
    the memory of its device."""
    device = resolve_device(config.device)
    if isinstance(config, Config):
        _episodic(config, device)
    else:
        _ordinary(config, device)


def _parameters(model: torch.nn.Module | None, config: Any, device: torch.device) -> None:
    if model is None:
        return
    count = sum(p.numel() for p in model.parameters())
    require(
        4 * count * BYTES[config.dtype],
        f"the network ({config.model.backbone}, model.options {config.model.options}: {count:,} parameters, with "
        "their gradients and Adam's two moments)",
        device=device,
        fix="make it smaller (model.options)",
    )


def _episodic(config: Config, device: torch.device) -> None:
    dataset = get_episodic(config.data.name)
    perturbation = build_perturbation(config.perturb.name, config.perturb.options)  # (may read files: not on meta)
    learner = meta_built(lambda: build_learner(config, perturbation))
    _parameters(learner, config, device)
    d, b = config.data, BYTES[config.dtype]
    if dataset.regression:
        way, shape, example = 1, f"{dataset.channels} features", dataset.channels * b
    else:
        size = d.image_size or dataset.image_size or 1
        way, shape, example = d.way, f"{dataset.channels}x{size}x{size} images", dataset.channels * size * size * b
    eval_shot = d.eval_shot or d.shot
    tasks = config.train.meta_batch
    require(
        tasks * way * (d.shot + d.query) * example,
        f"train.meta_batch={tasks} (one meta-batch: {tasks} tasks of {way} x ({d.shot} + {d.query}) {shape}, "
        f"{config.dtype})",
        device=device,
        fix="lower train.meta_batch (or the tasks' way, shot and query)",
    )
    tasks = min(config.eval.tasks_per_batch, config.eval.episodes)
    require(
        tasks * way * (eval_shot + d.query) * example,
        f"eval.tasks_per_batch={config.eval.tasks_per_batch} (one batch of {tasks} test episodes of {way} x "
        f"({eval_shot} + {d.query}) {shape})",
        device=device,
        fix="lower eval.tasks_per_batch",
    )
    if learner is None or learner.mc_batch:
        for key, samples, shot in (
            ("inner.mc_samples", config.inner.mc_samples, d.shot),
            ("inner.eval_mc_samples", config.inner.eval_mc_samples, eval_shot),
        ):
            require(
                samples * way * shot * example,
                f"{key}={samples} (batched Monte-Carlo samples: the support set of {way} x {shot} {shape} stacked "
                f"{samples} times)",
                device=device,
                fix=f"lower {key}, or set inner.mc_batch=sequential",
            )
    require(16 * config.eval.episodes, f"eval.episodes={config.eval.episodes} (a score and an NLL per episode)")


def _ordinary(config: MetaTrainConfig | TransferConfig, device: torch.device) -> None:
    size, b = config.data.image_size, BYTES[config.dtype]
    example = IMAGE_CHANNELS * size * size * b
    require(
        config.train.batch_size * example,
        f"train.batch_size={config.train.batch_size} (one batch of {IMAGE_CHANNELS}x{size}x{size} images, "
        f"{config.dtype})",
        device=device,
        fix="lower train.batch_size (or data.image_size)",
    )
    classes = config.data.classes or 1
    phi = config.perturb.phi if isinstance(config, TransferConfig) else "learned"
    factory = perturbation_factory(config.perturb, phi)
    network = meta_built(lambda: build_network(config.model.backbone, classes, size, config.model.options, factory))
    _parameters(network, config, device)
    if isinstance(config, TransferConfig) and getattr(factory, "sample_at_test", False):
        d = config.data
        images = min(PREDICTION_BATCH, d.test_per_class * classes if d.test_per_class else 1)
        counts = {"perturb.mc_samples": config.perturb.mc_samples}
        if config.eval_every:
            counts["eval_mc_samples"] = config.eval_mc_samples
        for key, samples in counts.items():
            require(
                samples * images * classes * 4,
                f"{key}={samples} (Monte-Carlo test predictions: {samples} softmax outputs of {images} images and "
                f"{classes} classes at once)",
                device=device,
                fix=f"lower {key}",
            )
