"""MetaPerturb's meta-testing (Algorithm 2): train a new network on a target data set with phi fixed,
then test it with Monte-Carlo averaged predictions. The baselines run in the same harness: no
perturbation ("Base") and fine-tuning (the network's convolutions start from a source network).

Training follows the released code: Adam (lr 1e-3, weight decay 5e-4), the learning rate times
0.3 at 40%, 70% and 90% of the steps, the perturbation's strength c rising linearly from 0 to 1
over the first 40% of the steps, random crops and flips. Test predictions average the softmax over
S noise samples (S = 100 at the end, as in the released code), with batch norm and the
perturbation's scale on their running statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint, state_to_tensors, tensors_to_state
from ..data.augment import normalize, to_channels
from ..data.labeled import LabeledImages
from ..errors import CheckpointError, ConfigError, DivergenceError
from ..evaluate.calibration import expected_calibration_error, reliability
from ..evaluate.episodes import EvalResult
from ..perturb.attach import set_strength
from ..perturb.metaperturb import MetaPerturbFunction
from ..nets.modes import eval_mode
from ..seeds import derive_seed, seeded
from .joint_trainer import annealed_strength, training_batch
from .loop import StepLoop, checkpoint_problem, nonfinite_count, optimizer_tensors

CHECKPOINT = "checkpoint"
COLUMNS = ["step", "loss", "accuracy", "lr", "strength", "test_accuracy", "seconds", "images_per_s"]


def learning_rate(base: float, step: int, steps: int, milestones: list[float], gamma: float) -> float:
    """Step schedule: ``base * gamma^k`` after k of the milestones (fractions of ``steps``)."""
    return base * gamma ** sum(step >= int(m * steps) for m in milestones)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, *, samples: int, channels: int, device: torch.device, dtype: torch.dtype,
            seed: int, batch_size: int = 250) -> Tensor:
    """Class probabilities of ``images`` (uint8), the softmax averaged over ``samples`` forward
    passes (the perturbation's noise), in eval mode; reproducible for a ``seed`` (torch's generator
    is forked, so the caller's random state is untouched)."""
    out = []
    with seeded(seed, device), eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = normalize(to_channels(images[start:start + batch_size], channels), dtype).to(device)
            out.append(torch.stack([F.softmax(model(x), dim=1) for _ in range(samples)]).mean(0).double().cpu())
    return torch.cat(out)


def load_convolutions(model: nn.Module, source: dict[str, Tensor], prefix: str = "") -> int:
    """Fine-tuning's start: copy every convolution's weights (and bias) from a source network's
    state (keys ``prefix + name``); batch norm and the classifier keep their fresh initialization.
    Returns the number of tensors copied."""
    copied = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        for pname, param in module.named_parameters(recurse=False):
            key = f"{prefix}{name}.{pname}"
            if key not in source or source[key].shape != param.shape:
                raise CheckpointError(f"the source network has no {key} of shape {tuple(param.shape)}: fine-tuning needs the same backbone")
            with torch.no_grad():
                param.copy_(source[key])
            copied += 1
    if not copied:
        raise ConfigError("the network has no convolutions to fine-tune")
    return copied


class TransferTrainer:
    """Trains ``model`` (perturbed with ``phi`` if given, frozen) on ``train``; tests on ``test``."""

    def __init__(self, model: nn.Module, phi: MetaPerturbFunction | None, train: LabeledImages, test: LabeledImages, *,
                 out: str | Path, device: torch.device, dtype: torch.dtype, steps: int, batch_size: int, lr: float,
                 weight_decay: float, milestones: list[float], gamma: float, anneal: float, augment: bool, seed: int,
                 channels: int = 3, eval_every: int | None = None, eval_mc_samples: int = 5, log_every: int = 50,
                 checkpoint_every: int = 500, meta: dict[str, Any] | None = None, progress: bool = True):
        self.model, self.phi, self.train, self.test, self.out = model, phi, train, test, Path(out)
        self.device, self.dtype, self.channels, self.seed = device, dtype, channels, seed
        self.steps, self.batch_size, self.lr, self.milestones, self.gamma = steps, batch_size, lr, milestones, gamma
        self.anneal, self.augment = anneal, augment
        self.eval_every, self.eval_mc_samples = eval_every, eval_mc_samples
        self.log_every, self.checkpoint_every, self.meta, self.progress = log_every, checkpoint_every, meta or {}, progress
        if phi is not None and any(p.requires_grad for p in phi.parameters()):
            raise ConfigError("phi must be frozen at meta-test time (load it with metareg.perturb.pretrained.load_phi)")
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        self.step, self.seconds = 0, 0.0

    def train_step(self, step: int) -> dict[str, Tensor]:
        strength = annealed_strength(step, self.steps, self.anneal) if self.phi is not None else 0.0
        if self.phi is not None:
            set_strength(self.phi, strength)
        lr = learning_rate(self.lr, step, self.steps, self.milestones, self.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = training_batch(self.train, self.batch_size, step, derive_seed(self.seed, 0), augment=self.augment,
                              channels=self.channels, dtype=self.dtype)
        x, y = x.to(self.device), y.to(self.device)
        torch.manual_seed(derive_seed(self.seed, step, 2))  # the perturbation's noise
        self.model.train()
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "accuracy": (out.argmax(1) == y).float().mean(), "lr": torch.tensor(lr),
                "strength": torch.tensor(strength)}

    def check(self) -> str | None:
        """None if the state about to be saved is good: every tensor finite, and a finite loss of
        the network (eval mode, so no running statistic moves) on a fixed training batch."""
        bad = int(nonfinite_count(list(self.model.state_dict().values()) + optimizer_tensors(self.optimizer)))
        loss = float("nan")
        if not bad:
            x, y = training_batch(self.train, self.batch_size, 0, derive_seed(self.seed, 0), augment=False, channels=self.channels,
                                  dtype=self.dtype)
            with torch.no_grad(), seeded(0, self.device), eval_mode(self.model):
                loss = F.cross_entropy(self.model(x.to(self.device)), y.to(self.device)).item()
        return checkpoint_problem(bad, loss)

    def samples(self, requested: int) -> int:
        """Monte-Carlo samples: one when nothing is stochastic."""
        return requested if self.phi is not None and self.phi.sample else 1

    def evaluate(self, samples: int) -> tuple[Tensor, Tensor]:
        """(probabilities [N, K], per-image correctness [N]) on the test set."""
        probabilities = predict(self.model, self.test.images, samples=self.samples(samples), channels=self.channels,
                                device=self.device, dtype=self.dtype, seed=derive_seed(self.seed, 3))
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
        if self.phi is not None:
            set_strength(self.phi, 1.0)
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
