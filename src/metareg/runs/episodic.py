"""Episodic meta-learning runs (``metareg train / test / compare``): build the learner and task
sources a :class:`~metareg.config.Config` describes, meta-train into a run folder, meta-test a
checkpoint on the fixed episode stream, compare two models on the same episodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, write_json_atomic
from ..config import Config
from ..data import build_task_source, get_episodic
from ..data.tasks import TaskSource
from ..errors import CheckpointError, ConfigError
from ..evaluate import EvalResult, evaluate, paired_difference
from ..inner import build_inner_rule
from ..meta.bilevel import BilevelLearner, select_fast
from ..meta.distributed import World
from ..meta.trainer import MetaTrainer
from ..nets import create_model
from ..perturb import build_perturbation
from .common import (
    command_line,
    config_of_run,
    dtype_of,
    prepare_run_folder,
    resolve_device,
    resolve_mc_batch,
    resolve_strategy,
)


def is_regression(config: Config) -> bool:
    return get_episodic(config.data.name).regression


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
    """The model with its perturbation slots, the inner rule and the bilevel scheme of ``config``."""
    dataset = get_episodic(config.data.name)
    perturbation = build_perturbation(config.model.perturbation, config.model.perturbation_options)
    model = create_model(
        config.model.backbone,
        1 if dataset.regression else config.data.way,
        in_channels=dataset.channels,
        image_size=config.data.image_size or dataset.image_size or 1,
        perturbation=perturbation,
        **config.model.options,
    )
    params = dict(model.named_parameters())
    fast = {n: params[n] for n in select_fast(model, config.inner.fast)}
    groups = model.layer_groups() if hasattr(model, "layer_groups") else None
    device = resolve_device(config.device)
    inner = build_inner_rule(
        fast,
        step=config.inner.step,
        lr=config.inner.lr,
        steps=config.inner.steps,
        transforms=config.inner.transforms,
        groups=groups,
    )
    return BilevelLearner(
        model,
        inner,
        task="regression" if dataset.regression else "classification",
        inner_steps=config.inner.steps,
        eval_inner_steps=config.inner.eval_steps,
        first_order=config.inner.first_order,
        fast=config.inner.fast,
        mc_samples=config.inner.mc_samples,
        eval_mc_samples=config.inner.eval_mc_samples,
        strategy=resolve_strategy(
            config.train.strategy,
            device,
            config.model.backbone,
            getattr(perturbation, "vmap_safe", True),
            config.train.recompute,
        ),
        mc_batch=resolve_mc_batch(config.inner.mc_batch, device, model),
        recompute=config.train.recompute,
        precision=config.train.precision,
        task_chunk=config.train.task_chunk,
        memory_budget=config.train.memory_budget,
        workers=config.train.workers,
    )


def _protocol(config: Config, split: str, shot: int) -> dict[str, Any]:
    d = config.data
    return {
        "data": d.name,
        "split": split,
        "way": None if is_regression(config) else d.way,
        "shot": shot,
        "query": d.query,
        "image_size": d.image_size,
        "options": d.options,
    }


def meta_test(
    config: Config,
    learner: BilevelLearner,
    *,
    episodes: int | None = None,
    seed: int | None = None,
    shot: int | None = None,
    split: str | None = None,
    progress: bool = True,
    attack: Any = None,
    world: World | None = None,
) -> EvalResult:
    """Meta-test on ``episodes`` episodes of the test split (the stream fixed by ``seed``);
    ``attack`` (e.g. ``metareg.evaluate.adversarial.FGSM(0.1)``) perturbs the query images. Under
    torchrun (``world``) the processes share the episodes and gather the scores."""
    split = split or config.data.test_split
    shot = shot or config.data.eval_shot or config.data.shot
    device = world.device if world is not None else resolve_device(config.device)
    return evaluate(
        learner,
        build_source(config, split, shot=shot),
        episodes=episodes or config.eval.episodes,
        seed=config.eval.seed if seed is None else seed,
        tasks_per_batch=config.eval.tasks_per_batch,
        device=device,
        dtype=dtype_of(config),
        progress=progress,
        desc=f"{split} {shot}-shot",
        protocol=_protocol(config, split, shot),
        attack=attack,
        world=world,
    )


def train(
    config: Config,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    deadline: float | None = None,
    world: World | None = None,
) -> MetaTrainer:
    """Meta-train ``config`` into run folder ``out`` (or continue it with ``resume``); past
    ``deadline`` (``time.monotonic()``) stop with a checkpoint (``trainer.finished`` is then false).
    Under torchrun (``world``, :func:`metareg.meta.distributed.session`) the processes share every
    meta-batch; the first one writes the log and checkpoints."""
    out = Path(out)
    world = world or World(device=resolve_device(config.device))
    prepare_run_folder(out, resume, config, main=world.is_main)
    device = world.device
    dtype = dtype_of(config)
    torch.manual_seed(config.seed)
    learner = build_learner(config).to(device=device, dtype=dtype)
    source = build_source(config, config.data.train_split)
    validate = None
    if config.data.val_split:
        val_source = build_source(config, config.data.val_split)

        def validate(model: BilevelLearner) -> tuple[float, float]:
            e = evaluate(
                model,
                val_source,
                episodes=config.train.val_episodes,
                seed=config.eval.seed + 1,
                tasks_per_batch=config.eval.tasks_per_batch,
                device=device,
                dtype=dtype,
                progress=False,
                world=world,
            ).estimate
            return e.mean, e.ci95

    t = config.train
    trainer = MetaTrainer(
        learner,
        source,
        out=out,
        iterations=t.iterations,
        meta_batch=t.meta_batch,
        meta_lr=t.meta_lr,
        clip=t.clip,
        seed=config.seed,
        device=device,
        dtype=dtype,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        val_every=t.val_every,
        validate=validate,
        meta={"config": config.to_dict(), "kind": "bilevel", "command": command_line()},
        progress=progress,
        cuda_graph=t.cuda_graph,
        deadline=deadline,
        world=world,
    )
    if resume:
        trainer.resume()
    trainer.run(resume_log=resume)
    return trainer


def load_learner(path: str | Path, config: Config | None = None) -> tuple[Config, BilevelLearner]:
    """Rebuild the learner of a checkpoint (a run folder or its ``checkpoint.json``)."""
    config = config or config_of_run(path, "bilevel")
    tensors, _ = load_checkpoint(path)
    learner = build_learner(config)
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    try:
        learner.load_state_dict(params)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit its model: {str(err).splitlines()[0]}") from None
    return config, learner.to(device=resolve_device(config.device), dtype=dtype_of(config))


def save_result(result: EvalResult, path: str | Path) -> None:
    write_json_atomic(Path(path), result.to_dict())


def compare(a: EvalResult, b: EvalResult) -> dict[str, Any]:
    """Paired difference a - b on the same episodes; refuses results measured on different
    episodes or under different test conditions (an attack). How each model adapts (its inner
    steps, its noise samples S) may differ: that is part of the model being compared."""
    own = ("steps", "mc_samples")
    keys = (set(a.protocol) | set(b.protocol)) - set(own)
    diff = {k: (a.protocol.get(k), b.protocol.get(k)) for k in keys if a.protocol.get(k) != b.protocol.get(k)}
    if diff:
        raise ConfigError(f"the two results were not measured on the same episodes: {diff}")
    if a.scores.numel() < 2:
        raise ConfigError(
            f"a paired comparison needs at least 2 episodes (its confidence interval comes from their spread), "
            f"got {a.scores.numel()}: test on more episodes"
        )
    return {"a": a.estimate, "b": b.estimate, "difference": paired_difference(a.scores, b.scores)}
