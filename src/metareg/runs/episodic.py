"""Episodic meta-learning runs (``metareg train / test / compare``): build the learner and task
sources a :class:`~metareg.config.Config` describes, meta-train into a run folder, meta-test a
checkpoint on the fixed episode stream, compare two models on the same episodes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..build import build_learner, build_source, dtype_of, is_regression, resolve_device, test_dataset
from ..checkpoint import write_json_atomic
from ..config import Config
from ..errors import ConfigError, MetaregError
from ..evaluate import EvalResult, evaluate, paired_difference
from ..meta.bilevel import BilevelLearner
from ..meta.distributed import World
from ..meta.loop import RunContext
from ..meta.ordinary import load_convolutions
from ..meta.trainer import MetaTrainer
from ..runfolder import prepare_run_folder, read_result
from ..runlock import run_lock
from .common import command_line


def _protocol(config: Config, split: str, shot: int) -> dict[str, Any]:
    d = config.data
    return {
        "data": test_dataset(config, split),
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
    with run_lock(out, world):  # one writer per run folder (the first process of a distributed run)
        return _train(config, out, resume=resume, progress=progress, deadline=deadline, world=world)


def _train(
    config: Config, out: Path, *, resume: bool, progress: bool, deadline: float | None, world: World
) -> MetaTrainer:
    prepare_run_folder(out, resume, config, main=world.is_main)
    device = world.device
    dtype = dtype_of(config)
    torch.manual_seed(config.seed)
    learner = build_learner(config).to(device=device, dtype=dtype)
    if config.model.init_from and not resume:
        start_from_pretrained(learner, config.model.init_from)
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

    meta = {"config": config.to_dict(), "kind": "bilevel", "command": command_line()}
    context = RunContext(out, config.seed, device, dtype, world, meta, progress, deadline)
    trainer = MetaTrainer(learner, source, config.train, context, validate=validate)
    if resume:
        trainer.resume()
    trainer.run(resume_log=resume)
    return trainer


def start_from_pretrained(learner: BilevelLearner, run: str | Path) -> int:
    """MetaSGD*'s start (DropGrad Section 4.1): the feature extractor of a supervised pre-training
    run (``metareg perturb transfer``, same backbone) copied into the network to meta-train: every
    convolution and the batch-norm weights and biases; the classifier (another set of classes) and the
    inner rule keep their fresh initialization. Returns the number of tensors copied."""
    from ..build import source_state

    tensors, prefix = source_state(run)
    return load_convolutions(learner.model, tensors, prefix, norms=True)


def save_result(result: EvalResult, path: str | Path) -> None:
    write_json_atomic(Path(path), result.to_dict())


def result_path(path: Path, result: EvalResult) -> Path:
    """Where a result measured now goes by default: ``path``, unless that holds a result measured
    on other episodes or under other test conditions (another shot, seed, attack...), which is kept:
    then ``<stem>-<digest of the protocol>.json`` beside it."""
    protocol = json.loads(json.dumps(result.protocol))
    if path.exists():
        try:
            if read_result(path)["protocol"] == protocol:
                return path
        except MetaregError:  # a damaged file is not replaced either
            pass
        digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:8]
        return path.with_name(f"{path.stem}-{digest}.json")
    return path


def compare(a: EvalResult, b: EvalResult) -> dict[str, Any]:
    """Paired difference a - b on the same episodes; refuses results measured on different
    episodes or under different test conditions (an attack). How each model adapts (its inner
    steps, its noise samples S) may differ: that is part of the model being compared."""
    own = ("steps", "mc_samples")
    keys = (set(a.protocol) | set(b.protocol)) - set(own)
    diff = {k: (a.protocol.get(k), b.protocol.get(k)) for k in keys if a.protocol.get(k) != b.protocol.get(k)}
    if diff:
        raise ConfigError(f"the two results were not measured on the same episodes: {diff}")
    for name, result in (("A", a), ("B", b)):
        if not all(math.isfinite(s) for s in result.scores.tolist()):
            raise ConfigError(f"{name}'s scores are not all finite numbers (NaN or infinite): nothing to compare")
    if a.scores.numel() < 2:
        raise ConfigError(
            f"a paired comparison needs at least 2 episodes (its confidence interval comes from their spread), "
            f"got {a.scores.numel()}: test on more episodes"
        )
    return {"a": a.estimate, "b": b.estimate, "difference": paired_difference(a.scores, b.scores)}
