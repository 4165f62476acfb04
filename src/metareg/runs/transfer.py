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
from torch import Tensor, nn

from ..checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    state_to_tensors,
    tensors_to_state,
    write_json_atomic,
)
from ..config import ImageDataConfig, PerturbConfig, TransferConfig
from ..data.augment import normalize, to_channels, training_batch
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
from ..evaluate.stats import paired_difference
from ..meta.loop import StepLoop, checkpoint_problem, nonfinite_count, optimizer_tensors
from ..nets.modes import eval_mode, perturbation_strength, set_training_progress
from ..nets.slots import perturbation_parameter_names, perturbed_loss, recording
from ..perturb import MetaPerturb, build_perturbation
from ..perturb.pretrained import phi_info
from ..seeds import derive_seed, seeded
from .common import (
    IMAGE_CHANNELS,
    build_network,
    config_of_run,
    dtype_of,
    prepare_run_folder,
    resolve_device,
)

CHECKPOINT_JSON = f"{CHECKPOINT}.json"
COLUMNS = ["step", "loss", "accuracy", "lr", "strength", "test_accuracy", "seconds", "images_per_s"]


def perturbation_factory(p: PerturbConfig, phi: str = "learned") -> Any:
    """The slot factory of a run's perturbation config (MetaPerturb with its phi, clip and annealing)."""
    if p.name == "metaperturb":
        return build_perturbation("metaperturb", {"phi": phi, "clip": p.clip, "anneal": p.anneal} | p.options)
    return build_perturbation(p.name, p.options)


def learning_rate(base: float, step: int, steps: int, milestones: list[float], gamma: float) -> float:
    """Step schedule: ``base * gamma^k`` after k of the milestones (fractions of ``steps``)."""
    return base * gamma ** sum(step >= int(m * steps) for m in milestones)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    *,
    samples: int,
    channels: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    sample: bool = True,
    batch_size: int = 250,
) -> Tensor:
    """Class probabilities of ``images`` (uint8, or floating-point pixels in [0, 1]), the softmax averaged over
    ``samples`` forward
    passes (the perturbation's noise, when ``sample``), in eval mode; reproducible for a ``seed``
    (torch's generator is forked, so the caller's random state is untouched)."""
    out = []
    with seeded(seed, device), eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = normalize(to_channels(images[start : start + batch_size], channels), dtype).to(device)
            out.append(
                torch.stack([F.softmax(model(x, sample=sample), dim=1) for _ in range(samples)]).mean(0).double().cpu()
            )
    return torch.cat(out)


def load_convolutions(model: nn.Module, source: dict[str, Tensor], prefix: str = "") -> int:
    """Fine-tuning's start: copy every convolution's weights (and bias) from a source network's
    state (keys ``prefix + name``); batch norm, the classifier and the perturbations keep their
    fresh initialization. Returns the number of tensors copied."""
    perturbation = set(perturbation_parameter_names(model))
    copied = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        for pname, param in module.named_parameters(recurse=False):
            key = f"{prefix}{name}.{pname}"
            if key.removeprefix(prefix) in perturbation:
                continue
            if key not in source or source[key].shape != param.shape:
                raise CheckpointError(
                    f"the source network has no {key} of shape {tuple(param.shape)}: fine-tuning needs the same "
                    f"backbone"
                )
            with torch.no_grad():
                param.copy_(source[key])
            copied += 1
    if not copied:
        raise ConfigError("the network has no convolutions to fine-tune")
    return copied


class TransferTrainer:
    """Trains ``model`` (its perturbation's parameters, if any, frozen) on ``train``; tests on ``test``.
    ``sample_at_test``: the perturbation samples at test time (predictions are MC averages)."""

    def __init__(
        self,
        model: nn.Module,
        train: LabeledImages,
        test: LabeledImages,
        *,
        out: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        steps: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        milestones: list[float],
        gamma: float,
        augment: bool,
        seed: int,
        sample_at_test: bool = False,
        channels: int = IMAGE_CHANNELS,
        eval_every: int | None = None,
        eval_mc_samples: int = 5,
        log_every: int = 50,
        checkpoint_every: int = 500,
        meta: dict[str, Any] | None = None,
        progress: bool = True,
        deadline: float | None = None,
    ):
        self.model, self.train, self.test, self.out = model, train, test, Path(out)
        self.deadline, self.finished = deadline, False
        self.device, self.dtype, self.channels, self.seed = device, dtype, channels, seed
        self.steps, self.batch_size, self.lr, self.milestones, self.gamma = steps, batch_size, lr, milestones, gamma
        self.augment, self.sample_at_test = augment, sample_at_test
        self.eval_every, self.eval_mc_samples = eval_every, eval_mc_samples
        self.log_every, self.checkpoint_every, self.meta, self.progress = (
            log_every,
            checkpoint_every,
            meta or {},
            progress,
        )
        # A meta-learned function (MetaPerturb's phi) is fixed at meta-test time; a baseline's own
        # parameters (Information Dropout's and VIB's noise scales) train with the network, as in their papers.
        shared = getattr(model, "perturbation_function", None)
        if shared is not None and any(p.requires_grad for p in shared.parameters()):
            raise ConfigError(
                "MetaPerturb's phi must be frozen when transferring: load a meta-trained phi (perturb.phi: "
                "builtin or a run)"
            )
        self.optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        self.step, self.seconds = 0, 0.0
        self.tail: list[
            Tensor
        ] = []  # training-batch accuracies of the last 10% of the steps (the final training accuracy)

    def train_step(self, step: int) -> dict[str, Tensor]:
        set_training_progress(self.model, step / max(self.steps, 1))  # MetaPerturb's annealed strength
        lr = learning_rate(self.lr, step, self.steps, self.milestones, self.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = training_batch(
            self.train,
            self.batch_size,
            step,
            derive_seed(self.seed, 0),
            augment=self.augment,
            channels=self.channels,
            dtype=self.dtype,
        )
        x, y = x.to(self.device), y.to(self.device)
        torch.manual_seed(derive_seed(self.seed, step, 2))  # the perturbation's noise
        self.model.train()
        with recording() as record:
            out = self.model(x, sample=True)
        loss = perturbed_loss(F.cross_entropy, out, y, record)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        accuracy = (out.argmax(1) == y).float().mean()
        if step >= self.steps - max(1, self.steps // 10):
            self.tail.append(accuracy)
        return {
            "loss": loss.detach(),
            "accuracy": accuracy,
            "lr": torch.tensor(lr),
            "strength": torch.tensor(perturbation_strength(self.model)),
        } | record.metrics

    def check(self) -> str | None:
        """None if the state about to be saved is good: every tensor finite, and a finite loss of
        the network (eval mode, so no running statistic moves) on a fixed training batch."""
        bad = int(nonfinite_count(list(self.model.state_dict().values()) + optimizer_tensors(self.optimizer)))
        loss = float("nan")
        if not bad:
            x, y = training_batch(
                self.train,
                self.batch_size,
                0,
                derive_seed(self.seed, 0),
                augment=False,
                channels=self.channels,
                dtype=self.dtype,
            )
            with torch.no_grad(), seeded(0, self.device), eval_mode(self.model):
                loss = F.cross_entropy(
                    self.model(x.to(self.device), sample=self.sample_at_test), y.to(self.device)
                ).item()
        return checkpoint_problem(bad, loss)

    def samples(self, requested: int) -> int:
        """Monte-Carlo samples: one when nothing is sampled at test time."""
        return requested if self.sample_at_test else 1

    def evaluate(self, samples: int) -> tuple[Tensor, Tensor]:
        """(probabilities [N, K], per-image correctness [N]) on the test set."""
        probabilities = predict(
            self.model,
            self.test.images,
            samples=self.samples(samples),
            channels=self.channels,
            device=self.device,
            dtype=self.dtype,
            seed=derive_seed(self.seed, 3),
            sample=self.sample_at_test,
        )
        return probabilities, (probabilities.argmax(1) == self.test.labels).double()

    def run(self, resume_log: bool = False) -> None:
        def evaluate() -> dict[str, float]:
            return {"test_accuracy": self.evaluate(self.eval_mc_samples)[1].mean().item()}

        # MetaPerturb's diagnostics: the mean noise z and scale s of every perturbed block (as the released code
        # meters them)
        blocks = sorted(m.index for m in self.model.modules() if isinstance(m, MetaPerturb))
        columns = COLUMNS[:-2] + [f"z{i}" for i in blocks] + [f"s{i}" for i in blocks] + COLUMNS[-2:]
        loop = StepLoop(
            self.out,
            self.steps,
            self.log_every,
            self.checkpoint_every,
            columns,
            eval_every=self.eval_every,
            shown=("loss", "accuracy", "test_accuracy"),
            per_step=self.batch_size,
            desc="train",
            progress=self.progress,
            hint="lower optim.lr",
            rate_column="images_per_s",
            deadline=self.deadline,
        )
        self.finished = loop.run(
            self.train_step, self, evaluate=evaluate if self.eval_every else None, resume_log=resume_log
        )

    def final_test(self, samples: int, protocol: dict[str, Any]) -> tuple[EvalResult, dict[str, Any]]:
        """The test set's per-image correctness (an :class:`EvalResult`, paired across models tested
        on the same images) and calibration: negative log-likelihood, ECE and the reliability bins."""
        set_training_progress(self.model, 1.0)
        probabilities, correct = self.evaluate(samples)
        if not torch.isfinite(probabilities).all():
            raise DivergenceError(
                "the network's test predictions are not finite: its weights have diverged; train again with a lower "
                "optim.lr"
            )
        nll = F.nll_loss(probabilities.clamp_min(1e-12).log(), self.test.labels).item()
        extra = {
            "nll": nll,
            "ece": expected_calibration_error(probabilities, self.test.labels),
            "reliability": reliability(probabilities, self.test.labels),
            # the perturbed training batches' accuracy over the last 10% of the steps (how well the network fits)
            "final_train_accuracy": torch.stack(self.tail).mean().item() if self.tail else None,
        }
        info = protocol | {"mc_samples": self.samples(samples), "test_images": len(self.test)}
        return EvalResult(correct, info), extra

    # ----------------------------------------------------------------------------- persistence
    def save(self) -> Path:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim = state_to_tensors("optim", self.optimizer.state_dict(), tensors)
        if (
            self.tail
        ):  # the last steps' training accuracies so far, so that a resumed run reports the same final accuracy
            tensors["train.tail"] = torch.stack(self.tail).detach().cpu()
        return save_checkpoint(
            self.out, CHECKPOINT, tensors, {"optimizer": optim, "seconds": self.seconds} | self.meta, self.step
        )

    def resume(self) -> None:
        tensors, meta = load_checkpoint(self.out, CHECKPOINT)
        try:
            self.model.load_state_dict(
                {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            )
            self.optimizer.load_state_dict(tensors_to_state(meta["optimizer"], tensors))
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint in {self.out} does not fit this run: {str(err).splitlines()[0]}"
            ) from None
        self.step, self.seconds = int(meta["step"]), float(meta.get("seconds", 0.0))
        self.tail = list(tensors["train.tail"].to(self.device).unbind()) if "train.tail" in tensors else []


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


def _source_state(run: str | Path) -> tuple[dict[str, Tensor], str]:
    """A transfer run's network state and the key prefix of its backbone's tensors."""
    tensors, _ = load_checkpoint(run, CHECKPOINT)
    prefix = (
        "model.model." if any(k.startswith("model.model.") for k in tensors) else "model."
    )  # runs from before the slots
    return tensors, prefix


def samples_at_test(config: TransferConfig) -> bool:
    """Whether the run's perturbation samples at test time (its predictions are MC averages)."""
    return bool(getattr(perturbation_factory(config.perturb), "sample_at_test", False))


def load_transfer_model(run: str | Path) -> tuple[TransferConfig, nn.Module]:
    """The trained network of a transfer run (with its perturbation slots), on the CPU, in eval mode."""
    config = config_of_run(run, "transfer")
    tensors, meta = load_checkpoint(run, CHECKPOINT)
    size = config.data.image_size
    net = build_network(
        config.model.backbone,
        int(meta.get("num_classes", 0)) or 1,
        size,
        config.model.options,
        perturbation_factory(config.perturb),
    )
    try:
        net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint in {run} does not fit its network: {str(err).splitlines()[0]}") from None
    return config, net.eval()


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
        source, prefix = _source_state(config.init_from)
        load_convolutions(net, source, prefix)
    phi_record = None
    if config.perturb.name == "metaperturb":
        phi_record = {
            k: v
            for k, v in phi_info(config.perturb.phi).items()
            if k in ("path", "sha256", "source", "backbone", "steps")
        }
    model = net.to(device, dtype)
    o = config.optim
    trainer = TransferTrainer(
        model,
        train,
        test,
        out=out,
        device=device,
        dtype=dtype,
        steps=o.steps,
        batch_size=o.batch_size,
        lr=o.lr,
        weight_decay=o.weight_decay,
        milestones=o.milestones,
        gamma=o.gamma,
        augment=o.augment,
        seed=config.seed,
        sample_at_test=getattr(factory, "sample_at_test", False),
        eval_every=config.eval_every,
        eval_mc_samples=config.eval_mc_samples,
        log_every=o.log_every,
        checkpoint_every=o.checkpoint_every,
        meta={"config": config.to_dict(), "kind": "transfer", "num_classes": train.num_classes},
        progress=progress,
        deadline=deadline,
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
    result, extra = trainer.final_test(config.perturb.mc_samples, protocol)
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
