"""Runs as a user starts them: meta-train a config into a run folder, meta-test a checkpoint,
compare two models on the same episodes. The command line is a thin layer over these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .builders import (
    build_learner,
    build_source,
    dtype_of,
    is_regression,
    resolve_device,
)
from .checkpoint import check_run_folder, load_checkpoint, read_checkpoint_meta, write_json_atomic
from .config import Config
from .errors import CheckpointError, ConfigError, MetaregError
from .evaluate import EvalResult, evaluate, paired_difference
from .meta.bilevel import BilevelLearner
from .meta.trainer import CHECKPOINT, MetaTrainer


def _protocol(config: Config, split: str, shot: int) -> dict[str, Any]:
    d = config.data
    return {"data": d.name, "split": split, "way": None if is_regression(config) else d.way, "shot": shot, "query": d.query,
            "image_size": d.image_size, "options": d.options}


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
) -> EvalResult:
    """Meta-test on ``episodes`` episodes of the test split (the stream fixed by ``seed``);
    ``attack`` (e.g. ``metareg.evaluate.adversarial.FGSM(0.1)``) perturbs the query images."""
    split = split or config.data.test_split
    shot = shot or config.data.eval_shot or config.data.shot
    device = resolve_device(config.device)
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
    )


def train(config: Config, out: str | Path, *, resume: bool = False, progress: bool = True) -> MetaTrainer:
    """Meta-train ``config`` into run folder ``out`` (or continue it with ``resume``)."""
    out = Path(out)
    check_run_folder(out, resume, CHECKPOINT)
    device = resolve_device(config.device)
    dtype = dtype_of(config)
    torch.manual_seed(config.seed)
    learner = build_learner(config).to(device=device, dtype=dtype)
    source = build_source(config, config.data.train_split)
    validate = None
    if config.data.val_split:
        val_source = build_source(config, config.data.val_split)

        def validate(model: BilevelLearner) -> tuple[float, float]:
            e = evaluate(model, val_source, episodes=config.train.val_episodes, seed=config.eval.seed + 1,
                         tasks_per_batch=config.eval.tasks_per_batch, device=device, dtype=dtype, progress=False).estimate
            return e.mean, e.ci95

    t = config.train
    trainer = MetaTrainer(
        learner, source, out=out, iterations=t.iterations, meta_batch=t.meta_batch, meta_lr=t.meta_lr, clip=t.clip,
        seed=config.seed, device=device, dtype=dtype, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
        val_every=t.val_every, validate=validate, meta={"config": config.to_dict()}, progress=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.resume()
    else:
        write_json_atomic(out / "config.json", config.to_dict())
    trainer.run(resume_log=resume)
    return trainer


def config_of_checkpoint(path: str | Path) -> Config:
    """The config stored in a checkpoint (without loading its tensors)."""
    json_path, meta = read_checkpoint_meta(path)
    try:
        return Config.from_dict(meta["config"])
    except (KeyError, TypeError, MetaregError) as err:
        raise CheckpointError(f"{json_path} holds no valid metareg config ({err})") from None


def load_learner(path: str | Path, config: Config | None = None) -> tuple[Config, BilevelLearner]:
    """Rebuild the learner of a checkpoint (a run folder or its ``checkpoint.json``)."""
    stored = config_of_checkpoint(path)
    config = config or stored
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
        raise ConfigError(f"a paired comparison needs at least 2 episodes (its confidence interval comes from their spread), "
                          f"got {a.scores.numel()}: test on more episodes")
    return {"a": a.estimate, "b": b.estimate, "difference": paired_difference(a.scores, b.scores)}
