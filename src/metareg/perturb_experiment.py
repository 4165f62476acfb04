"""MetaPerturb runs as users start them (the command line is a thin layer over these functions):

* :func:`meta_train`: split a source data set class-wise into T tasks and meta-train phi jointly
  (Algorithm 1), in one process or in several started by torchrun; writes ``phi.json`` +
  ``phi.safetensors`` (the 82 parameters with their provenance) into the run folder.
* :func:`transfer`: train a network of any backbone on a target data set with a fixed phi (or
  none, or fine-tuned from a source network) and test it (Algorithm 2); writes ``test.json``.

A run folder also holds ``config.json``, ``log.csv`` and an atomic checkpoint for ``--resume``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .builders import resolve_device
from .checkpoint import check_run_folder, load_checkpoint, read_checkpoint_meta, write_json_atomic
from .config import ImageDataConfig, MetaTrainConfig, TransferConfig
from .data.labeled import LabeledImages, choose_classes, class_tasks, keep_classes, load_labeled, split_per_class, take_per_class
from .errors import CheckpointError, DataError, MetaregError
from .meta import distributed
from .meta.joint import JointLearner
from .meta.joint_trainer import CHECKPOINT, JointTrainer
from .meta.transfer import TransferTrainer, load_convolutions
from .nets import STANDARD_OPTIONS, create_model
from .perturb.attach import attach_metaperturb
from .perturb.metaperturb import MetaPerturbFunction
from .perturb.pretrained import load_phi, phi_info, save_phi
from .seeds import derive_seed

CHANNELS = 3  # networks take RGB; grayscale data is repeated over 3 channels (as the reference does)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _load(d: ImageDataConfig, split: str) -> LabeledImages:
    return load_labeled(d.name, split, root=d.root, image_size=d.image_size, **d.options)


def source_tasks(config: MetaTrainConfig) -> list[tuple[LabeledImages, LabeledImages]]:
    """The T class-disjoint source tasks (D_t^tr, D_t^te) of a meta-training config."""
    d = config.data
    source = _load(d, d.train_split)
    if d.classes:
        source = keep_classes(source, choose_classes(source, d.classes, d.seed))
    if d.train_per_class:
        source = take_per_class(source, d.train_per_class, d.seed)
    return class_tasks(source, config.tasks, seed=d.seed, train_fraction=config.train_fraction)


def target_data(d: ImageDataConfig) -> tuple[LabeledImages, LabeledImages]:
    """(training images, test images) of a transfer target: see :class:`ImageDataConfig`."""
    train = _load(d, d.train_split)
    test = None if d.test_split == d.train_split else _load(d, d.test_split)
    if test is not None and list(test.class_names) != list(train.class_names):
        raise DataError(f"{d.name}: the {d.train_split} and {d.test_split} splits have different classes; use one split "
                        "for both (data.test_split = data.train_split) and divide it with data.train_per_class")
    if d.classes:
        chosen = choose_classes(train, d.classes, d.seed)
        train, test = keep_classes(train, chosen), (None if test is None else keep_classes(test, chosen))
    if test is None:
        return split_per_class(train, d.train_per_class, d.seed, rest=d.test_per_class)
    if d.train_per_class:
        train = take_per_class(train, d.train_per_class, d.seed)
    if d.test_per_class:
        test = take_per_class(test, d.test_per_class, d.seed)
    return train, test


def build_network(name: str, num_classes: int, image_size: int, options: dict[str, Any]) -> torch.nn.Module:
    """A backbone in its ordinary-training form (running batch-norm statistics, He init)."""
    return create_model(name, num_classes, in_channels=CHANNELS, image_size=image_size, **(STANDARD_OPTIONS.get(name, {}) | options))


def _prepare_folder(out: Path, resume: bool, config: Any, main: bool = True) -> None:
    check_run_folder(out, resume, CHECKPOINT)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json_atomic(out / "config.json", {"kind": "meta-train" if isinstance(config, MetaTrainConfig) else "transfer"} | config.to_dict())


def _provenance(config: Any, seconds: float, processes: int = 1) -> dict[str, Any]:
    return {"config": config.to_dict(), "command": " ".join(["metareg", *sys.argv[1:]]) if sys.argv else "", "metareg": __version__,
            "processes": processes, "training_seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def meta_train(config: MetaTrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> JointTrainer:
    """Meta-train phi (Algorithm 1) into run folder ``out``; under torchrun each process trains its
    share of the tasks. Returns the trainer (its ``learner.phi`` is the result)."""
    out = Path(out)
    world = distributed.setup(resolve_device(config.device))
    try:
        _prepare_folder(out, resume, config, world.is_main)
        dtype = DTYPES[config.dtype]
        tasks = source_tasks(config)
        share = world.share(config.tasks)
        classes = [tasks[t][0].num_classes for t in share]
        widest = max(train.num_classes for train, _ in tasks)
        size = config.data.image_size

        def build(t: int) -> torch.nn.Module:
            torch.manual_seed(derive_seed(config.seed, t, 11))  # theta_t's init depends on t only, not on the process
            return build_network(config.model.backbone, widest, size, config.model.options)

        torch.manual_seed(derive_seed(config.seed, 12))
        phi = MetaPerturbFunction(clip=config.perturb.clip)
        strategy = config.strategy if config.strategy != "auto" else ("vmap" if world.device.type == "cuda" else "loop")
        learner = JointLearner(build, share, config.tasks, phi, input_shape=(CHANNELS, size, size), at=config.model.at,
                               strategy=strategy, classes=classes).to(world.device, dtype)
        world.broadcast(learner.phi_parameters())
        o = config.optim
        trainer = JointTrainer(learner, [tasks[t] for t in share], world=world, out=out, steps=o.steps, batch_size=o.batch_size, lr=o.lr,
                               weight_decay=o.weight_decay, anneal=config.perturb.anneal, augment=o.augment, seed=config.seed, dtype=dtype,
                               channels=CHANNELS, log_every=o.log_every, checkpoint_every=o.checkpoint_every,
                               meta={"config": config.to_dict(), "kind": "meta-train"}, progress=progress)
        if resume:
            trainer.resume()
        trainer.run(resume_log=resume)
        if world.is_main:
            source = {"data": config.data.name, "split": config.data.train_split, "image_size": size, "tasks": config.tasks,
                      "classes": sum(t[0].num_classes for t in tasks), "train_images": sum(len(t[0]) for t in tasks)}
            save_phi(out, phi, {"source": source, "backbone": config.model.backbone, "steps": trainer.step}
                     | _provenance(config, trainer.seconds, world.size))
        return trainer
    finally:
        distributed.teardown(world)


def _source_state(run: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A transfer run's network state and the key prefix of its backbone's tensors."""
    tensors, _ = load_checkpoint(run, CHECKPOINT)
    prefix = "model.model." if any(k.startswith("model.model.") for k in tensors) else "model."
    return tensors, prefix


def config_of_run(run: str | Path, kind: str) -> Any:
    """The config stored in a run's checkpoint."""
    json_path, meta = read_checkpoint_meta(run, CHECKPOINT)
    schema = MetaTrainConfig if kind == "meta-train" else TransferConfig
    if meta.get("kind") != kind:
        raise CheckpointError(f"{json_path} is not a {kind} run (it is {meta.get('kind') or 'a bilevel run'})")
    try:
        return schema.from_dict(meta["config"])
    except (KeyError, TypeError, MetaregError) as err:
        raise CheckpointError(f"{json_path} holds no valid {kind} config ({err})") from None


def load_transfer_model(run: str | Path) -> tuple[TransferConfig, torch.nn.Module]:
    """The trained network of a transfer run (with its perturbation slots), on the CPU, in eval mode."""
    config = config_of_run(run, "transfer")
    tensors, meta = load_checkpoint(run, CHECKPOINT)
    size = config.data.image_size
    net = build_network(config.model.backbone, int(meta.get("num_classes", 0)) or 1, size, config.model.options)
    model = attach_metaperturb(net, MetaPerturbFunction(clip=config.perturb.clip), config.model.at, (CHANNELS, size, size)) \
        if config.perturb.name == "metaperturb" else net
    try:
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint in {run} does not fit its network: {str(err).splitlines()[0]}") from None
    return config, model.eval()


def transfer(config: TransferConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and test a network on a target data set (Algorithm 2); returns the ``test.json`` record."""
    out = Path(out)
    _prepare_folder(out, resume, config)
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    train, test = target_data(config.data)
    size = config.data.image_size
    torch.manual_seed(derive_seed(config.seed, 21))
    net = build_network(config.model.backbone, train.num_classes, size, config.model.options)
    if config.init_from:
        source, prefix = _source_state(config.init_from)
        load_convolutions(net, source, prefix)
    phi, model, phi_record = None, net, None
    if config.perturb.name == "metaperturb":
        phi = load_phi(config.perturb.phi, clip=config.perturb.clip)
        phi_record = {k: v for k, v in phi_info(config.perturb.phi).items() if k in ("path", "sha256", "source", "backbone", "steps")}
        model = attach_metaperturb(net, phi, config.model.at, (CHANNELS, size, size))
    model = model.to(device, dtype)
    o = config.optim
    trainer = TransferTrainer(model, phi, train, test, out=out, device=device, dtype=dtype, steps=o.steps, batch_size=o.batch_size,
                              lr=o.lr, weight_decay=o.weight_decay, milestones=o.milestones, gamma=o.gamma, anneal=config.perturb.anneal,
                              augment=o.augment, seed=config.seed, channels=CHANNELS, eval_every=config.eval_every,
                              eval_mc_samples=config.eval_mc_samples, log_every=o.log_every, checkpoint_every=o.checkpoint_every,
                              meta={"config": config.to_dict(), "kind": "transfer", "num_classes": train.num_classes}, progress=progress)
    if resume:
        trainer.resume()
    trainer.run(resume_log=resume)
    d = config.data
    protocol = {"kind": "transfer", "data": d.name, "train_split": d.train_split, "test_split": d.test_split, "image_size": size,
                "classes": train.num_classes, "train_per_class": d.train_per_class, "test_per_class": d.test_per_class,
                "data_seed": d.seed, "options": d.options}
    result, extra = trainer.final_test(config.perturb.mc_samples, protocol)
    record = result.to_dict() | extra | {"backbone": config.model.backbone, "perturbation": config.perturb.name, "phi": phi_record,
                                         "init_from": config.init_from, "seed": config.seed, "steps": trainer.step,
                                         "train_images": len(train), "training_seconds": round(trainer.seconds, 1)}
    write_json_atomic(out / "test.json", record)
    return record
