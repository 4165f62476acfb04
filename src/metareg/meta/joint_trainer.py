"""The joint meta-training loop (MetaPerturb Algorithm 1): batches, the two Adam optimizers, the
noise annealing, the all-reduce of phi's gradient, logs and exact resume.

Every step: each task's train batch -> theta_t's gradient -> Adam step of every theta_t; each task's
test batch -> phi's gradient -> all-reduce across processes -> Adam step of phi. Batches come from
per-task epoch permutations and augmentations seeded by (run seed, task, split, step), and noise
from seeds of (run seed, step, pass, task), so a resumed run continues exactly and a task's data
and noise do not depend on the process that trains it: with the loop strategy, 2 processes give
the same phi as 1 (tested, up to the order of floating-point sums).

A checkpoint holds phi, both optimizers' states and every task network; in a multi-process run
rank 0 gathers them all, so a run may resume with another number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..checkpoint import state_to_tensors, tensors_to_state
from ..config import OptimConfig
from ..data.augment import training_batch
from ..data.labeled import LabeledImages
from ..nets.modes import perturbation_strength, set_training_progress
from ..seeds import derive_seed, seeded
from .joint import TEST_PASS, TRAIN_PASS, JointLearner
from .loop import CheckpointedTrainer, RunContext, optimizer_tensors

COLUMNS = ["step", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "strength", "seconds", "images_per_s"]


class JointTrainer(CheckpointedTrainer):
    """Meta-trains ``learner``'s phi with the ``train`` section of a
    :class:`~metareg.config.MetaTrainConfig` (``settings``); ``tasks[i]`` = (D^tr, D^te) of
    ``learner.task_ids[i]``."""

    def __init__(
        self,
        learner: JointLearner,
        tasks: list[tuple[LabeledImages, LabeledImages]],
        settings: OptimConfig,
        context: RunContext,
        *,
        channels: int = 3,
    ):
        super().__init__(context, settings.steps, settings.log_every, settings.checkpoint_every)
        self.learner, self.tasks = learner, tasks
        self.steps, self.batch_size, self.augment = settings.steps, settings.batch_size, settings.augment
        self.seed, self.dtype, self.channels = context.seed, context.dtype, channels
        lr, decay = settings.lr, settings.weight_decay
        self.theta_optimizer = torch.optim.Adam(learner.theta_parameters(), lr=lr, weight_decay=decay)
        self.phi_optimizer = torch.optim.Adam(learner.phi_parameters(), lr=lr, weight_decay=decay)

    # ------------------------------------------------------------------------------------ step
    def batch(self, which: int, step: int) -> tuple[Tensor, Tensor]:
        """Every local task's batch of its train (``which=0``) or test (1) split: [T_local, B, ...]."""
        parts = [
            training_batch(
                pair[which],
                self.batch_size,
                step,
                derive_seed(self.seed, task, which),
                augment=self.augment,
                channels=self.channels,
                dtype=self.dtype,
            )
            for task, pair in zip(self.learner.task_ids, self.tasks)
        ]
        x, y = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        return x.to(self.world.device), y.to(self.world.device)

    def train_step(self, step: int) -> dict[str, Tensor]:
        set_training_progress(self.learner, step / max(self.steps, 1))  # MetaPerturb's annealed strength
        x, y = self.batch(TRAIN_PASS, step)
        self.theta_optimizer.zero_grad(set_to_none=True)
        train = self.learner.theta_backward(x, y, seed=self.seed, step=step)
        self.theta_optimizer.step()
        x, y = self.batch(TEST_PASS, step)
        self.phi_optimizer.zero_grad(set_to_none=True)
        test = self.learner.phi_backward(x, y, seed=self.seed, step=step)
        # One all-reduce per step: phi's gradient (each task's loss is already divided by T) and
        # the metrics summed over tasks.
        params = self.learner.phi_parameters()
        grads = []
        for p in params:  # a part of phi an ablation switches off (MetaPerturb without s or z) gets none
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        sums = torch.stack([train["loss"].sum(), train["accuracy"].sum(), test["loss"].sum(), test["accuracy"].sum()])
        flat = self.world.all_reduce_sum(torch.cat([g.flatten() for g in grads] + [sums.to(params[0].dtype)]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        self.phi_optimizer.step()
        means = flat[offset:] / self.learner.num_tasks
        return dict(zip(("train_loss", "train_accuracy", "test_loss", "test_accuracy"), means)) | {
            "strength": torch.tensor(perturbation_strength(self.learner))
        }

    def checked_tensors(self) -> list[Tensor]:
        return (
            list(self.learner.state_dict().values())
            + optimizer_tensors(self.theta_optimizer)
            + optimizer_tensors(self.phi_optimizer)
        )

    def probe_loss(self) -> Tensor:
        """The summed loss of this process's task networks (eval mode) on their fixed first test batches."""
        x, y = (
            torch.stack(parts)
            for parts in zip(
                *(
                    training_batch(
                        pair[TEST_PASS],
                        self.batch_size,
                        0,
                        derive_seed(self.seed, task, 1),
                        augment=False,
                        channels=self.channels,
                        dtype=self.dtype,
                    )
                    for task, pair in zip(self.learner.task_ids, self.tasks)
                )
            )
        )
        with seeded(0, self.world.device):
            return self.learner.probe_losses(x.to(self.world.device), y.to(self.world.device)).sum()

    def run(self, resume_log: bool = False) -> None:
        self.run_steps(
            COLUMNS,
            resume_log=resume_log,
            shown=("train_loss", "test_loss", "test_accuracy"),
            per_step=2 * self.batch_size * self.learner.num_tasks,
            desc="meta-train phi",
            hint="lower train.lr or set perturb.clip",
            rate_column="images_per_s",
        )

    # ----------------------------------------------------------------------------- persistence
    def _task_tensors(self) -> dict[str, Tensor]:
        """Every task network's state and Adam state, gathered from all processes: ``task<t>.<name>``
        and ``optim.task<t>.<param>.<slot>``."""
        nets = self.learner.networks
        out: dict[str, Tensor] = {}
        per_key: dict[str, list[Tensor]] = {}
        for net in nets:
            for key, value in self.learner.task_state(net).items():
                per_key.setdefault(f"{{}}.{key}", []).append(value)
            for name, p in self.learner.task_parameters(net):
                for slot, value in self.theta_optimizer.state[p].items():
                    per_key.setdefault(f"optim.{{}}.{name}.{slot}", []).append(value)
        for pattern, values in per_key.items():
            gathered = self.world.gather_tasks(torch.stack(values).to(self.world.device))
            for t in range(len(gathered)):
                out[pattern.format(f"task{t}")] = gathered[t]
        return out

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"phi.{k}": v for k, v in self.learner.phi_state().items()}
        optim = state_to_tensors("optim.phi", self.phi_optimizer.state_dict(), tensors)
        tensors |= self._task_tensors()  # collective: every process takes part
        return tensors, {"phi_optimizer": optim}

    def load_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        phi = {k.removeprefix("phi."): v for k, v in tensors.items() if k.startswith("phi.")}
        if set(phi) != set(self.learner.phi_names):
            raise KeyError(f"phi holds {sorted(phi)}, this run's perturbation {self.learner.phi_names}")
        with torch.no_grad():
            for name, value in phi.items():
                self.learner.phi_state()[name].copy_(value)
        self.phi_optimizer.load_state_dict(tensors_to_state(info["phi_optimizer"], tensors))
        state, index = {}, 0
        for net, task in zip(self.learner.networks, self.learner.task_ids):
            prefix = f"task{task}."
            net.load_state_dict(
                {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
                | self.learner.phi_state()
            )
            for name, _ in self.learner.task_parameters(net):
                head = f"optim.task{task}.{name}."
                state[index] = {k.removeprefix(head): v for k, v in tensors.items() if k.startswith(head)}
                index += 1
        groups = self.theta_optimizer.state_dict()["param_groups"]
        self.theta_optimizer.load_state_dict({"state": {i: s for i, s in state.items() if s}, "param_groups": groups})
