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

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, state_to_tensors, tensors_to_state, write_json_atomic
from ..config import ImageDataConfig, PerturbConfig, TransferConfig
from ..data.augment import normalize, to_channels, training_batch
from ..data.labeled import LabeledImages, choose_classes, keep_classes, load_labeled, split_per_class, take_per_class
from ..errors import CheckpointError, ConfigError, DataError, DivergenceError
from ..evaluate.calibration import expected_calibration_error, reliability
from ..evaluate.episodes import EvalResult
from ..meta.loop import StepLoop, checkpoint_problem, nonfinite_count, optimizer_tensors
from ..nets.modes import eval_mode, perturbation_strength, set_training_progress
from ..nets.slots import perturbation_parameter_names
from ..perturb import MetaPerturb, build_perturbation
from ..perturb.pretrained import phi_info
from ..seeds import derive_seed, seeded
from .common import IMAGE_CHANNELS, build_network, config_of_run, dtype_of, prepare_run_folder, resolve_device

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
def predict(model: nn.Module, images: Tensor, *, samples: int, channels: int, device: torch.device, dtype: torch.dtype,
            seed: int, sample: bool = True, batch_size: int = 250) -> Tensor:
    """Class probabilities of ``images`` (uint8), the softmax averaged over ``samples`` forward
    passes (the perturbation's noise, when ``sample``), in eval mode; reproducible for a ``seed``
    (torch's generator is forked, so the caller's random state is untouched)."""
    out = []
    with seeded(seed, device), eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = normalize(to_channels(images[start:start + batch_size], channels), dtype).to(device)
            out.append(torch.stack([F.softmax(model(x, sample=sample), dim=1) for _ in range(samples)]).mean(0).double().cpu())
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
                raise CheckpointError(f"the source network has no {key} of shape {tuple(param.shape)}: fine-tuning needs the same backbone")
            with torch.no_grad():
                param.copy_(source[key])
            copied += 1
    if not copied:
        raise ConfigError("the network has no convolutions to fine-tune")
    return copied


class TransferTrainer:
    """Trains ``model`` (its perturbation's parameters, if any, frozen) on ``train``; tests on ``test``.
    ``sample_at_test``: the perturbation samples at test time (predictions are MC averages)."""

    def __init__(self, model: nn.Module, train: LabeledImages, test: LabeledImages, *, out: str | Path, device: torch.device,
                 dtype: torch.dtype, steps: int, batch_size: int, lr: float, weight_decay: float, milestones: list[float], gamma: float,
                 augment: bool, seed: int, sample_at_test: bool = False, channels: int = IMAGE_CHANNELS, eval_every: int | None = None,
                 eval_mc_samples: int = 5, log_every: int = 50, checkpoint_every: int = 500, meta: dict[str, Any] | None = None,
                 progress: bool = True):
        self.model, self.train, self.test, self.out = model, train, test, Path(out)
        self.device, self.dtype, self.channels, self.seed = device, dtype, channels, seed
        self.steps, self.batch_size, self.lr, self.milestones, self.gamma = steps, batch_size, lr, milestones, gamma
        self.augment, self.sample_at_test = augment, sample_at_test
        self.eval_every, self.eval_mc_samples = eval_every, eval_mc_samples
        self.log_every, self.checkpoint_every, self.meta, self.progress = log_every, checkpoint_every, meta or {}, progress
        learned = [n for n, p in model.named_parameters() if p.requires_grad and n in set(perturbation_parameter_names(model))]
        if learned:
            raise ConfigError(f"the perturbation's parameters must be frozen when transferring ({', '.join(learned[:3])}...): "
                              "load a meta-trained phi (metareg.perturb.pretrained.load_phi)")
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        self.step, self.seconds = 0, 0.0

    def train_step(self, step: int) -> dict[str, Tensor]:
        set_training_progress(self.model, step / max(self.steps, 1))  # MetaPerturb's annealed strength
        lr = learning_rate(self.lr, step, self.steps, self.milestones, self.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = training_batch(self.train, self.batch_size, step, derive_seed(self.seed, 0), augment=self.augment,
                              channels=self.channels, dtype=self.dtype)
        x, y = x.to(self.device), y.to(self.device)
        torch.manual_seed(derive_seed(self.seed, step, 2))  # the perturbation's noise
        self.model.train()
        out = self.model(x, sample=True)
        loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "accuracy": (out.argmax(1) == y).float().mean(), "lr": torch.tensor(lr),
                "strength": torch.tensor(perturbation_strength(self.model))}

    def check(self) -> str | None:
        """None if the state about to be saved is good: every tensor finite, and a finite loss of
        the network (eval mode, so no running statistic moves) on a fixed training batch."""
        bad = int(nonfinite_count(list(self.model.state_dict().values()) + optimizer_tensors(self.optimizer)))
        loss = float("nan")
        if not bad:
            x, y = training_batch(self.train, self.batch_size, 0, derive_seed(self.seed, 0), augment=False, channels=self.channels,
                                  dtype=self.dtype)
            with torch.no_grad(), seeded(0, self.device), eval_mode(self.model):
                loss = F.cross_entropy(self.model(x.to(self.device), sample=self.sample_at_test), y.to(self.device)).item()
        return checkpoint_problem(bad, loss)

    def samples(self, requested: int) -> int:
        """Monte-Carlo samples: one when nothing is sampled at test time."""
        return requested if self.sample_at_test else 1

    def evaluate(self, samples: int) -> tuple[Tensor, Tensor]:
        """(probabilities [N, K], per-image correctness [N]) on the test set."""
        probabilities = predict(self.model, self.test.images, samples=self.samples(samples), channels=self.channels, device=self.device,
                                dtype=self.dtype, seed=derive_seed(self.seed, 3), sample=self.sample_at_test)
        return probabilities, (probabilities.argmax(1) == self.test.labels).double()

    def run(self, resume_log: bool = False) -> None:
        def evaluate() -> dict[str, float]:
            return {"test_accuracy": self.evaluate(self.eval_mc_samples)[1].mean().item()}

        loop = StepLoop(self.out, self.steps, self.log_every, self.checkpoint_every, COLUMNS, eval_every=self.eval_every,
                        shown=("loss", "accuracy", "test_accuracy"), per_step=self.batch_size, desc="train", progress=self.progress,
                        hint="lower optim.lr", rate_column="images_per_s")
        loop.run(self.train_step, self, evaluate=evaluate if self.eval_every else None, resume_log=resume_log)

    def final_test(self, samples: int, protocol: dict[str, Any]) -> tuple[EvalResult, dict[str, Any]]:
        """The test set's per-image correctness (an :class:`EvalResult`, paired across models tested
        on the same images) and calibration: negative log-likelihood, ECE and the reliability bins."""
        set_training_progress(self.model, 1.0)
        probabilities, correct = self.evaluate(samples)
        if not torch.isfinite(probabilities).all():
            raise DivergenceError("the network's test predictions are not finite: its weights have diverged; train again with a lower "
                                  "optim.lr")
        nll = F.nll_loss(probabilities.clamp_min(1e-12).log(), self.test.labels).item()
        extra = {"nll": nll, "ece": expected_calibration_error(probabilities, self.test.labels),
                 "reliability": reliability(probabilities, self.test.labels)}
        info = protocol | {"mc_samples": self.samples(samples), "test_images": len(self.test)}
        return EvalResult(correct, info), extra

    # ----------------------------------------------------------------------------- persistence
    def save(self) -> Path:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim = state_to_tensors("optim", self.optimizer.state_dict(), tensors)
        return save_checkpoint(self.out, CHECKPOINT, tensors, {"optimizer": optim, "seconds": self.seconds} | self.meta, self.step)

    def resume(self) -> None:
        tensors, meta = load_checkpoint(self.out, CHECKPOINT)
        try:
            self.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
            self.optimizer.load_state_dict(tensors_to_state(meta["optimizer"], tensors))
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint in {self.out} does not fit this run: {str(err).splitlines()[0]}") from None
        self.step, self.seconds = int(meta["step"]), float(meta.get("seconds", 0.0))


# ------------------------------------------------------------------------------------- the run
def load_images(d: ImageDataConfig, split: str) -> LabeledImages:
    return load_labeled(d.name, split, root=d.root, image_size=d.image_size, **d.options)


def target_data(d: ImageDataConfig) -> tuple[LabeledImages, LabeledImages]:
    """(training images, test images) of a transfer target: see :class:`ImageDataConfig`."""
    train = load_images(d, d.train_split)
    test = None if d.test_split == d.train_split else load_images(d, d.test_split)
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


def _source_state(run: str | Path) -> tuple[dict[str, Tensor], str]:
    """A transfer run's network state and the key prefix of its backbone's tensors."""
    tensors, _ = load_checkpoint(run, CHECKPOINT)
    prefix = "model.model." if any(k.startswith("model.model.") for k in tensors) else "model."  # runs from before the slots
    return tensors, prefix


def load_transfer_model(run: str | Path) -> tuple[TransferConfig, nn.Module]:
    """The trained network of a transfer run (with its perturbation slots), on the CPU, in eval mode."""
    config = config_of_run(run, "transfer")
    tensors, meta = load_checkpoint(run, CHECKPOINT)
    size = config.data.image_size
    net = build_network(config.model.backbone, int(meta.get("num_classes", 0)) or 1, size, config.model.options,
                        perturbation_factory(config.perturb))
    try:
        net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint in {run} does not fit its network: {str(err).splitlines()[0]}") from None
    return config, net.eval()


def transfer(config: TransferConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train and test a network on a target data set (Algorithm 2); returns the ``test.json`` record."""
    out = Path(out)
    prepare_run_folder(out, resume, config)
    device, dtype = resolve_device(config.device), dtype_of(config)
    train, test = target_data(config.data)
    size = config.data.image_size
    factory = perturbation_factory(config.perturb, config.perturb.phi)
    torch.manual_seed(derive_seed(config.seed, 21))
    net = build_network(config.model.backbone, train.num_classes, size, config.model.options, factory)
    if config.init_from:
        source, prefix = _source_state(config.init_from)
        load_convolutions(net, source, prefix)
    phi_record = None
    if config.perturb.name == "metaperturb":
        phi_record = {k: v for k, v in phi_info(config.perturb.phi).items() if k in ("path", "sha256", "source", "backbone", "steps")}
    model = net.to(device, dtype)
    o = config.optim
    trainer = TransferTrainer(model, train, test, out=out, device=device, dtype=dtype, steps=o.steps, batch_size=o.batch_size, lr=o.lr,
                              weight_decay=o.weight_decay, milestones=o.milestones, gamma=o.gamma, augment=o.augment, seed=config.seed,
                              sample_at_test=getattr(factory, "sample_at_test", False), eval_every=config.eval_every,
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


def run_scales(run: str | Path) -> tuple[str, list[str], list[Tensor]]:
    """(label, block names, s per block) of a transfer run with MetaPerturb: the scale each block
    applies to each channel at test time (from the running statistics; MetaPerturb Figure 7)."""
    config, model = load_transfer_model(run)
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, MetaPerturb)]
    if not slots:
        raise ConfigError(f"{run} was trained without MetaPerturb: it has no scales to plot")
    return (f"{Path(run).name}\n{config.data.name} / {config.model.backbone}", [name for name, _ in slots],
            [m.running_scales().float() for _, m in slots])
