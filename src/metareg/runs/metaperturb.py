"""MetaPerturb meta-training runs (``metareg perturb meta-train``, Algorithm 1): split a source data
set class-wise into T tasks and meta-train the perturbation phi jointly over T task networks, in
one process or in several started by torchrun; a MetaPerturb run writes ``phi.json`` +
``phi.safetensors`` (the 82 parameters with their provenance) into its folder. Any perturbation
with parameters can be meta-trained this way (``perturb.name``; e.g. Meta-Dropout's noise
generators), the run's checkpoint then holds it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..build import IMAGE_CHANNELS, build_joint_learner, dtype_of, resolve_device
from ..config import MetaTrainConfig
from ..data.labeled import (
    LabeledImages,
    choose_classes,
    class_tasks,
    instance_tasks,
    keep_classes,
    take_per_class,
)
from ..meta import distributed
from ..meta.joint_trainer import JointTrainer
from ..meta.loop import RunContext
from ..perturb.metaperturb import MetaPerturbFunction
from ..perturb.pretrained import save_phi
from ..runfolder import prepare_run_folder
from ..runlock import run_lock
from .common import command_line
from .transfer import load_images


def source_tasks(config: MetaTrainConfig) -> list[tuple[LabeledImages, LabeledImages]]:
    """The T source tasks (D_t^tr, D_t^te) of a meta-training config: class-disjoint (the paper's
    heterogeneous tasks), or with ``task_split: instances`` every class in every task, each task with
    its share of the images (Table 3(c)'s homogeneous tasks)."""
    d = config.data
    source = load_images(d, d.train_split)
    if d.classes:
        source = keep_classes(source, choose_classes(source, d.classes, d.seed))
    if d.train_per_class:
        source = take_per_class(source, d.train_per_class, d.seed)
    split = instance_tasks if config.task_split == "instances" else class_tasks
    return split(source, config.tasks, seed=d.seed, train_fraction=config.train_fraction)


def provenance(config: Any, seconds: float, processes: int = 1) -> dict[str, Any]:
    """How a stored artefact was made: the config, the command line, the version, the time."""
    return {
        "config": config.to_dict(),
        "command": command_line(),
        "metareg": __version__,
        "processes": processes,
        "training_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def meta_train(
    config: MetaTrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    deadline: float | None = None,
) -> JointTrainer:
    """Meta-train phi (Algorithm 1) into run folder ``out``; under torchrun each process trains its
    share of the tasks. Returns the trainer (``learner.phi_state()`` is the result)."""
    out = Path(out)
    world = distributed.setup(resolve_device(config.device))
    ended = False
    try:
        with run_lock(out, world):  # one writer per run folder (the first process of a distributed run)
            trainer = _meta_train(config, out, world, resume=resume, progress=progress, deadline=deadline)
        ended = True
        return trainer
    finally:
        distributed.teardown(world, together=ended)


def _meta_train(
    config: MetaTrainConfig,
    out: Path,
    world: distributed.World,
    *,
    resume: bool,
    progress: bool,
    deadline: float | None,
) -> JointTrainer:
    prepare_run_folder(out, resume, config, world.is_main)
    dtype = dtype_of(config)
    tasks = source_tasks(config)
    share = world.share(config.tasks)
    learner = build_joint_learner(config, [train.num_classes for train, _ in tasks], share, world.device, dtype)
    world.broadcast(learner.phi_parameters())
    context = RunContext(
        out,
        config.seed,
        world.device,
        dtype,
        world,
        meta={"config": config.to_dict(), "kind": "meta-train"},
        progress=progress,
        deadline=deadline,
    )
    trainer = JointTrainer(learner, [tasks[t] for t in share], config.train, context, channels=IMAGE_CHANNELS)
    if resume:
        trainer.resume()
    trainer.run(resume_log=resume)
    if world.is_main and trainer.finished and config.perturb.name == "metaperturb":
        source = {
            "data": config.data.name,
            "split": config.data.train_split,
            "image_size": config.data.image_size,
            "tasks": config.tasks,
            "classes": sum(t[0].num_classes for t in tasks),
            "train_images": sum(len(t[0]) for t in tasks),
        }
        save_phi(
            out,
            cast(MetaPerturbFunction, learner.networks[0].perturbation_function),  # metaperturb's phi
            {"source": source, "backbone": config.model.backbone, "steps": trainer.step}
            | provenance(config, trainer.seconds, world.size),
        )
    return trainer
