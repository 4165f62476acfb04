"""Transfer runs (``metareg perturb transfer``): a target data set's training and test images, the
network trained on them with a fixed perturbation in its slots (MetaPerturb's Algorithm 2, the
meta-test of a phi; the training itself is :mod:`metareg.meta.ordinary`), or none (Base), or
fine-tuned from a source network; the test with Monte-Carlo predictions, hyperparameter selection
on a validation split (``--select``) and the paired comparison with Base (``--against-base``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..build import IMAGE_CHANNELS, build_transfer_network, dtype_of, perturbation_factory, resolve_device
from ..checkpoint import (
    CHECKPOINT,
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
from ..errors import CheckpointError, ConfigError, DataError, DivergenceError
from ..evaluate.calibration import expected_calibration_error, reliability
from ..evaluate.episodes import EvalResult
from ..fewshot import load_transfer_model
from ..files import read_json
from ..meta.loop import RunContext
from ..meta.ordinary import TransferTrainer
from ..nets.modes import set_training_progress
from ..perturb import MetaPerturb
from ..perturb.pretrained import phi_info
from ..runfolder import prepare_run_folder, read_result, read_run
from ..runlock import run_lock
from .episodic import compare

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
        if d.train_per_class is None:  # refused by the config's check already
            raise ConfigError(f"data.train_per_class must be set: train and test images come from {d.train_split!r}")
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
    with run_lock(out):  # one writer per run folder
        return _transfer(config, out, resume=resume, progress=progress, deadline=deadline)


def _transfer(
    config: TransferConfig, out: Path, *, resume: bool, progress: bool, deadline: float | None
) -> dict[str, Any] | None:
    prepare_run_folder(out, resume, config, started=(out / CHECKPOINT_JSON).exists() or (out / "selection").is_dir())
    base = base_run(out) if config.against_base and config.perturb.name != "none" else None
    base_config = base_settings(config)
    if base is not None:  # a Base run of other settings is refused now, before anything trains
        check_base(base, base_config)
    train, test = target_data(config.data)
    if config.select:
        chosen = select_options(config, out, train, progress=progress, deadline=deadline)
        if chosen is None:
            return None
        config.perturb.options = config.perturb.options | chosen
    record = fit(
        config, train, test, out, resume=(out / CHECKPOINT_JSON).exists(), progress=progress, deadline=deadline
    )
    if record is None or base is None:
        return record
    with run_lock(base):
        if not (base / "test.json").is_file():
            if not (base / CHECKPOINT_JSON).exists():
                prepare_run_folder(base, False, base_config)
            resume_base = (base / CHECKPOINT_JSON).exists()
            if fit(base_config, train, test, base, resume=resume_base, progress=progress, deadline=deadline) is None:
                return None
        base_record = read_result(base / "test.json")
    # paired only if measured on the same test images (`metareg compare` refuses the same pairs)
    difference = compare(EvalResult.from_dict(record), EvalResult.from_dict(base_record))["difference"]
    return record | {
        "base": base_record,
        "difference": {"mean": difference.mean, "ci95": difference.ci95, "n": difference.n},
    }


def base_settings(config: TransferConfig) -> TransferConfig:
    """The Base run of ``--against-base``: ``config`` without its perturbation (same data, seed,
    schedule and test images)."""
    base = TransferConfig.from_dict(config.to_dict())
    base.perturb.name, base.perturb.options, base.select, base.against_base = "none", {}, False, False
    return base


#: Settings that do not change a transfer run's result (where it runs, how often it logs, checkpoints
#: or measures test accuracy on the way, where its data lies, the preset's name).
INCIDENTAL = (
    *("device", "preset", "data.root"),
    *("train.log_every", "train.checkpoint_every", "eval_every", "eval_mc_samples"),
)


def _matters_to_base(key: str) -> bool:
    """Of the perturbation section only its name and options act on a Base run (phi, clip, annealing
    and Monte-Carlo samples belong to perturbations that sample)."""
    return not key.startswith("perturb.") or key in ("perturb.name", "perturb.options")


def _flat(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options":
            out |= _flat(value, f"{where}{key}.")
        else:
            out[f"{where}{key}"] = value
    return out


def check_base(base: Path, expected: TransferConfig) -> None:
    """Refuse (one line) a started Base run in ``base`` made with other settings than ``expected``
    (another data seed, schedule, seed, test images...): its result would not pair with this run's,
    and continuing it under the new settings would mix two runs in one."""
    if not ((base / CHECKPOINT_JSON).exists() or (base / "config.json").exists()):
        return
    kind, stored = read_run(base)
    if kind != "transfer":
        raise ConfigError(f"{base} holds a {kind} run, not this run's Base run: remove it or choose another --out")
    theirs, ours = _flat(stored.to_dict()), _flat(expected.to_dict())
    differ = [
        k
        for k in sorted(set(theirs) | set(ours))
        if k not in INCIDENTAL and _matters_to_base(k) and theirs.get(k) != ours.get(k)
    ]
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:3])
        raise ConfigError(
            f"{base} holds a Base run of other settings ({shown}{', ...' if len(differ) > 3 else ''}), which would not "
            f"pair with this run: remove it (or move it away) to train the Base run again, or choose another --out"
        )


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
        chosen = read_json(record_path, "record of the options --select chose").get("chosen")
        if not isinstance(chosen, dict) or not all(isinstance(k, str) for k in chosen):
            raise CheckpointError(f"{record_path} is damaged (no 'chosen' options): remove it to choose them again")
        return chosen
    rest, validation = hold_out(train, VALIDATION_FRACTION, config.data.seed)
    results = []
    for i, options in enumerate(candidates(config.perturb.name)):
        trial = TransferConfig.from_dict(config.to_dict())
        trial.select, trial.perturb.options = False, config.perturb.options | options
        folder = out / "selection" / str(i)
        record: dict[str, Any] | None
        if (folder / "test.json").is_file():
            record = read_result(folder / "test.json")
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
    with run_lock(out):  # (re-entered where transfer() holds it already)
        return _fit(config, train, test, out, resume=resume, progress=progress, deadline=deadline)


def _fit(
    config: TransferConfig,
    train: LabeledImages,
    test: LabeledImages,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    deadline: float | None,
) -> dict[str, Any] | None:
    device, dtype = resolve_device(config.device), dtype_of(config)
    size = config.data.image_size
    net, factory = build_transfer_network(config, train.num_classes)
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
