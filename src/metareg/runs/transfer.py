"""Transfer runs (``metareg perturb transfer``): ordinary training of any backbone on a target data
set with a fixed perturbation in its slots (MetaPerturb's Algorithm 2, the meta-test of a phi), or
none (Base), or fine-tuned from a source network; then the test with Monte-Carlo predictions.

Training follows the released MetaPerturb code: Adam (lr 1e-3, weight decay 5e-4), the learning
rate times 0.3 at 40%, 70% and 90% of the steps, the perturbation's strength rising linearly from
0 to 1 over the first 40% (``perturb.anneal``), random crops and flips. Test predictions average
the softmax over S noise samples (S = 100 at the end, as in the released code) for perturbations
that sample at test time (MetaPerturb), with batch norm and the perturbation's scale on their
running statistics; one deterministic pass otherwise.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..build import IMAGE_CHANNELS, build_network, dtype_of, perturbation_factory, resolve_device
from ..checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    read_checkpoint_meta,
    write_json_atomic,
)
from ..config import ImageDataConfig, TransferConfig
from ..data.labeled import (
    LabeledImages,
    choose_classes,
    hold_out,
    keep_classes,
    load_labeled,
    split_per_class,
    take_per_class,
)
from ..errors import ConfigError, DataError, DivergenceError
from ..evaluate.calibration import expected_calibration_error, reliability
from ..evaluate.episodes import EvalResult
from ..evaluate.stats import paired_difference
from ..fewshot import load_transfer_model
from ..meta.loop import RunContext
from ..meta.ordinary import TransferTrainer, load_convolutions
from ..nets.modes import set_training_progress
from ..perturb import MetaPerturb
from ..perturb.pretrained import phi_info
from ..runfolder import prepare_run_folder
from ..seeds import derive_seed

CHECKPOINT_JSON = f"{CHECKPOINT}.json"


# ------------------------------------------------------------------------------------- the run
def load_images(d: ImageDataConfig, split: str) -> LabeledImages:
    return load_labeled(d.name, split, root=d.root, image_size=d.image_size, **d.options)


def target_data(d: ImageDataConfig) -> tuple[LabeledImages, LabeledImages]:
    """(training images, test images) of a transfer target: see :class:`ImageDataConfig`."""
    train = load_images(d, d.train_split)
    test = None if d.test_split == d.train_split else load_images(d, d.test_split)
    if test is not None and list(test.class_names) != list(train.class_names):
        raise DataError(
            f"{d.name}: the {d.train_split} and {d.test_split} splits have different classes; use one split "
            "for both (data.test_split = data.train_split) and divide it with data.train_per_class"
        )
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


def final_test(trainer: TransferTrainer, samples: int, protocol: dict[str, Any]) -> tuple[EvalResult, dict[str, Any]]:
    """A trained network's test: the test set's per-image correctness (an :class:`EvalResult`,
    paired across models tested on the same images) and calibration: negative log-likelihood, ECE
    and the reliability bins."""
    set_training_progress(trainer.model, 1.0)
    probabilities, correct = trainer.evaluate(samples)
    if not torch.isfinite(probabilities).all():
        raise DivergenceError(
            "the network's test predictions are not finite: its weights have diverged; train again with a lower "
            "train.lr"
        )
    nll = F.nll_loss(probabilities.clamp_min(1e-12).log(), trainer.test.labels).item()
    extra = {
        "nll": nll,
        "ece": expected_calibration_error(probabilities, trainer.test.labels),
        "reliability": reliability(probabilities, trainer.test.labels),
        # the perturbed training batches' accuracy over the last 10% of the steps (how well the network fits)
        "final_train_accuracy": torch.stack(trainer.tail).mean().item() if trainer.tail else None,
    }
    info = protocol | {"mc_samples": trainer.samples(samples), "test_images": len(trainer.test)}
    return EvalResult(correct, info), extra


def source_state(run: str | Path) -> tuple[dict[str, Tensor], str]:
    """A transfer run's network state and the key prefix of its backbone's tensors."""
    tensors, _ = load_checkpoint(run, CHECKPOINT)
    prefix = (
        "model.model." if any(k.startswith("model.model.") for k in tensors) else "model."
    )  # runs from before the slots
    return tensors, prefix


def samples_at_test(config: TransferConfig) -> bool:
    """Whether the run's perturbation samples at test time (its predictions are MC averages)."""
    return bool(getattr(perturbation_factory(config.perturb), "sample_at_test", False))


# Hyperparameter candidates of the baselines, chosen on a validation split (``--select``).
SELECTION_GRIDS: dict[str, dict[str, list[Any]]] = {
    "information-dropout": {"beta": [1e-5, 1e-4, 1e-3]},
    "vib": {"beta": [1e-5, 1e-4, 1e-3]},
    "dropblock": {"p": [0.05, 0.1, 0.2], "block_size": [3, 7]},
    "mixup": {"gamma": [0.2, 1.0, 2.0]},
    "manifold-mixup": {"gamma": [0.2, 1.0, 2.0]},
    "dropout": {"p": [0.1, 0.3, 0.5]},
    "spatial-dropout": {"p": [0.1, 0.3, 0.5]},
}
VALIDATION_FRACTION = 0.2  # of each class's training images, held out to choose the hyperparameters


def candidates(name: str) -> list[dict[str, Any]]:
    """Every combination of a perturbation's hyperparameter grid."""
    if name not in SELECTION_GRIDS:
        raise ConfigError(
            f"no hyperparameters to select for perturbation {name!r} (grids exist for {', '.join(SELECTION_GRIDS)})"
        )
    grid = SELECTION_GRIDS[name]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def transfer(
    config: TransferConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    deadline: float | None = None,
) -> dict[str, Any] | None:
    """Train and test a network on a target data set (Algorithm 2); returns the ``test.json`` record,
    or None when it stopped at the ``deadline`` before the end (with checkpoints to resume).

    ``config.select``: first choose the perturbation's hyperparameters (:data:`SELECTION_GRIDS`) on a
    validation split held out from the training images (:data:`VALIDATION_FRACTION` of each class,
    fixed by ``data.seed``): every candidate is trained on the rest with the run's schedule, in
    ``out/selection/<i>/`` (each resumable); the best validation accuracy wins (``selection.json``),
    then the network is trained on all the training images with it and tested."""
    out = Path(out)
    prepare_run_folder(out, resume, config, started=(out / CHECKPOINT_JSON).exists() or (out / "selection").is_dir())
    train, test = target_data(config.data)
    if config.select:
        chosen = select_options(config, out, train, progress=progress, deadline=deadline)
        if chosen is None:
            return None
        config.perturb.options = config.perturb.options | chosen
    record = fit(
        config, train, test, out, resume=(out / CHECKPOINT_JSON).exists(), progress=progress, deadline=deadline
    )
    if record is None or not config.against_base or config.perturb.name == "none":
        return record
    base = base_run(out)
    base_config = TransferConfig.from_dict(config.to_dict())
    base_config.perturb.name, base_config.perturb.options, base_config.select, base_config.against_base = (
        "none",
        {},
        False,
        False,
    )
    if not (base / "test.json").is_file():
        if not (base / CHECKPOINT_JSON).exists():
            prepare_run_folder(base, False, base_config)
        if (
            fit(
                base_config,
                train,
                test,
                base,
                resume=(base / CHECKPOINT_JSON).exists(),
                progress=progress,
                deadline=deadline,
            )
            is None
        ):
            return None
    base_record = json.loads((base / "test.json").read_text())
    difference = paired_difference(record["scores"], base_record["scores"])
    return record | {
        "base": base_record,
        "difference": {"mean": difference.mean, "ci95": difference.ci95, "n": difference.n},
    }


def stopped_at(out: str | Path) -> tuple[Path, int]:
    """Where a transfer that stopped at its time budget stands: the unfinished run folder (a
    ``--select`` candidate, the run itself, or its ``--against-base`` Base run) and its step."""
    out = Path(out)
    for folder in [
        *sorted((out / "selection").glob("*"), key=lambda f: int(f.name) if f.name.isdigit() else -1),
        out,
        base_run(out),
    ]:
        if (folder / CHECKPOINT_JSON).is_file() and not (folder / "test.json").is_file():
            return folder, int(read_checkpoint_meta(folder, CHECKPOINT)[1]["step"])
    return out, 0


def base_run(out: str | Path) -> Path:
    """Where ``--against-base`` trains the Base network beside run ``out``."""
    return Path(f"{out}-base")


def select_options(
    config: TransferConfig, out: Path, train: LabeledImages, *, progress: bool, deadline: float | None
) -> dict[str, Any] | None:
    """The best of the perturbation's candidate options on a held-out validation split (None if the
    deadline came first; the finished candidates are kept)."""
    record_path = out / "selection.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())["chosen"]
    rest, validation = hold_out(train, VALIDATION_FRACTION, config.data.seed)
    results = []
    for i, options in enumerate(candidates(config.perturb.name)):
        trial = TransferConfig.from_dict(config.to_dict())
        trial.select, trial.perturb.options = False, config.perturb.options | options
        folder = out / "selection" / str(i)
        if (folder / "test.json").is_file():
            record = json.loads((folder / "test.json").read_text())
        else:
            folder.mkdir(parents=True, exist_ok=True)
            record = fit(
                trial,
                rest,
                validation,
                folder,
                resume=(folder / CHECKPOINT_JSON).exists(),
                progress=progress,
                deadline=deadline,
            )
            if record is None:
                return None
        results.append({"options": options, "validation_accuracy": record["mean"]})
    best = max(results, key=lambda r: r["validation_accuracy"])
    write_json_atomic(
        record_path,
        {
            "perturbation": config.perturb.name,
            "validation_fraction": VALIDATION_FRACTION,
            "validation_images": len(validation),
            "candidates": results,
            "chosen": best["options"],
        },
    )
    return best["options"]


def fit(
    config: TransferConfig,
    train: LabeledImages,
    test: LabeledImages,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    deadline: float | None,
) -> dict[str, Any] | None:
    """Train a network on ``train`` and test it on ``test``, into run folder ``out``."""
    device, dtype = resolve_device(config.device), dtype_of(config)
    size = config.data.image_size
    factory = perturbation_factory(config.perturb, config.perturb.phi)
    torch.manual_seed(derive_seed(config.seed, 21))
    net = build_network(config.model.backbone, train.num_classes, size, config.model.options, factory)
    if config.init_from:
        source, prefix = source_state(config.init_from)
        load_convolutions(net, source, prefix)
    phi_record = None
    if config.perturb.name == "metaperturb":
        phi_record = {
            k: v
            for k, v in phi_info(config.perturb.phi).items()
            if k in ("path", "sha256", "source", "backbone", "steps")
        }
    model = net.to(device, dtype)
    context = RunContext(
        out,
        config.seed,
        device,
        dtype,
        meta={"config": config.to_dict(), "kind": "transfer", "num_classes": train.num_classes},
        progress=progress,
        deadline=deadline,
    )
    trainer = TransferTrainer(
        model,
        train,
        test,
        config.train,
        context,
        sample_at_test=getattr(factory, "sample_at_test", False),
        channels=IMAGE_CHANNELS,
        eval_every=config.eval_every,
        eval_mc_samples=config.eval_mc_samples,
    )
    if resume:
        trainer.resume()
    trainer.run(resume_log=resume)
    if not trainer.finished:
        return None
    d = config.data
    protocol = {
        "kind": "transfer",
        "data": d.name,
        "train_split": d.train_split,
        "test_split": d.test_split,
        "image_size": size,
        "classes": train.num_classes,
        "train_per_class": d.train_per_class,
        "test_per_class": d.test_per_class,
        "data_seed": d.seed,
        "options": d.options,
        "test_images": len(test),
    }
    result, extra = final_test(trainer, config.perturb.mc_samples, protocol)
    record = (
        result.to_dict()
        | extra
        | {
            "backbone": config.model.backbone,
            "perturbation": config.perturb.name,
            "perturbation_options": config.perturb.options,
            "phi": phi_record,
            "init_from": config.init_from,
            "seed": config.seed,
            "steps": trainer.step,
            "train_images": len(train),
            "training_seconds": round(trainer.seconds, 1),
        }
    )
    write_json_atomic(out / "test.json", record)
    return record


def run_scales(run: str | Path) -> tuple[str, list[str], list[Tensor]]:
    """(label, block names, s per block) of a transfer run with MetaPerturb: the scale each block
    applies to each channel at test time (from the running statistics; MetaPerturb Figure 7)."""
    config, model = load_transfer_model(run)
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, MetaPerturb)]
    if not slots:
        raise ConfigError(f"{run} was trained without MetaPerturb: it has no scales to plot")
    return (
        f"{Path(run).name}\n{config.data.name} / {config.model.backbone}",
        [name for name, _ in slots],
        [m.running_scales().float() for _, m in slots],
    )
