"""Ordinary training with a perturbation in the network's slots: MetaPerturb's Algorithm 2 (the
meta-test of a phi: a fixed perturbation, the network trained as usual), its baselines (none,
DropBlock, Information Dropout, ...) and fine-tuning, then the test with Monte-Carlo predictions.

Training follows the released MetaPerturb code: Adam (lr 1e-3, weight decay 5e-4), the learning
rate times 0.3 at 40%, 70% and 90% of the steps, the perturbation's strength rising linearly from
0 to 1 over the first 40% (``perturb.anneal``), random crops and flips. Test predictions average
the softmax over S noise samples (S = 100 at the end, as in the released code) for perturbations
that sample at test time (MetaPerturb), with batch norm and the perturbation's scale on their
running statistics; one deterministic pass otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import state_to_tensors, tensors_to_state
from ..config import OptimConfig
from ..data.augment import normalize, to_channels, training_batch
from ..data.labeled import LabeledImages
from ..errors import CheckpointError, ConfigError
from ..nets.layers import BatchNorm
from ..nets.modes import eval_mode, perturbation_strength, set_training_progress
from ..nets.slots import perturbation_parameter_names, perturbed_loss, recording
from ..perturb import MetaPerturb
from ..seeds import derive_seed, seeded
from .loop import CheckpointedTrainer, RunContext, optimizer_tensors

COLUMNS = ["step", "loss", "accuracy", "lr", "strength", "test_accuracy", "seconds", "images_per_s"]


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


def load_convolutions(model: nn.Module, source: dict[str, Tensor], prefix: str = "", *, norms: bool = False) -> int:
    """Fine-tuning's start: copy every convolution's weights (and bias) from a source network's
    state (keys ``prefix + name``); batch norm, the classifier and the perturbations keep their
    fresh initialization. ``norms=True``: the batch norms' weights and biases are copied too (a
    per-step batch norm gets the source's in every step's row); their running statistics are not.
    Returns the number of tensors copied."""
    perturbation = set(perturbation_parameter_names(model))
    kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, *((BatchNorm, _BatchNorm) if norms else ()))
    copied = 0
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        for pname, param in module.named_parameters(recurse=False):
            key = f"{prefix}{name}.{pname}"
            if key.removeprefix(prefix) in perturbation:
                continue
            found = source.get(key)
            shapes = (param.shape, param.shape[-1:]) if isinstance(module, BatchNorm) else (param.shape,)
            if found is None or found.shape not in shapes:
                raise CheckpointError(
                    f"the source network has no {key} of shape {tuple(param.shape)}: fine-tuning needs the same "
                    f"backbone"
                )
            with torch.no_grad():
                param.copy_(found.expand_as(param))
            copied += 1
    if not copied:
        raise ConfigError("the network has no convolutions to fine-tune")
    return copied


class TransferTrainer(CheckpointedTrainer):
    """Trains ``model`` (its perturbation's parameters, if any, frozen) on ``train`` with the
    ``train`` section of a :class:`~metareg.config.TransferConfig` (``settings``); tests on
    ``test``. ``sample_at_test``: the perturbation samples at test time (predictions are MC
    averages); ``eval_every``: test accuracy every so many steps, with ``eval_mc_samples``."""

    def __init__(
        self,
        model: nn.Module,
        train: LabeledImages,
        test: LabeledImages,
        settings: OptimConfig,
        context: RunContext,
        *,
        sample_at_test: bool = False,
        channels: int = 3,
        eval_every: int | None = None,
        eval_mc_samples: int = 5,
    ):
        super().__init__(context, settings.steps, settings.log_every, settings.checkpoint_every)
        self.model, self.train, self.test, self.settings = model, train, test, settings
        self.device, self.dtype, self.seed, self.channels = context.device, context.dtype, context.seed, channels
        self.steps, self.batch_size = settings.steps, settings.batch_size
        self.sample_at_test, self.eval_every, self.eval_mc_samples = sample_at_test, eval_every, eval_mc_samples
        # A meta-learned function (MetaPerturb's phi) is fixed at meta-test time; a baseline's own
        # parameters (Information Dropout's and VIB's noise scales) train with the network, as in their papers.
        shared = getattr(model, "perturbation_function", None)
        if shared is not None and any(p.requires_grad for p in shared.parameters()):
            raise ConfigError(
                "MetaPerturb's phi must be frozen when transferring: load a meta-trained phi (perturb.phi: "
                "builtin or a run)"
            )
        self.optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
        )
        # the training batches' accuracies over the last 10% of the steps (the final training accuracy)
        self.tail: list[Tensor] = []

    def train_step(self, step: int) -> dict[str, Tensor]:
        set_training_progress(self.model, step / max(self.steps, 1))  # MetaPerturb's annealed strength
        o = self.settings
        lr = learning_rate(o.lr, step, self.steps, o.milestones, o.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = training_batch(
            self.train,
            self.batch_size,
            step,
            derive_seed(self.seed, 0),
            augment=self.settings.augment,
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

    def checked_tensors(self) -> list[Tensor]:
        return list(self.model.state_dict().values()) + optimizer_tensors(self.optimizer)

    def probe_loss(self) -> Tensor:
        """The network's loss (eval mode, so no running statistic moves) on a fixed training batch."""
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
            return F.cross_entropy(self.model(x.to(self.device), sample=self.sample_at_test), y.to(self.device))

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
        self.run_steps(
            columns,
            evaluate=evaluate if self.eval_every else None,
            resume_log=resume_log,
            eval_every=self.eval_every,
            shown=("loss", "accuracy", "test_accuracy"),
            per_step=self.batch_size,
            desc="train",
            hint="lower train.lr",
            rate_column="images_per_s",
        )

    # ----------------------------------------------------------------------------- persistence
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim = state_to_tensors("optim", self.optimizer.state_dict(), tensors)
        if self.tail:  # the last steps' training accuracies so far: a resumed run reports the same final accuracy
            tensors["train.tail"] = torch.stack(self.tail).detach().cpu()
        return tensors, {"optimizer": optim}

    def load_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(tensors_to_state(info["optimizer"], tensors))
        self.tail = list(tensors["train.tail"].to(self.device).unbind()) if "train.tail" in tensors else []
