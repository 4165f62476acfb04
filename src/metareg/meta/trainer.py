"""The meta-training loop: sample tasks, meta-backward, clip, Adam step; log, validate, checkpoint.

Exact resume: a checkpoint holds the meta-parameters, the optimizer state, the step and every RNG
state (torch's global generator, which perturbations sample from, and the episode generator), so a
run killed and resumed on CPU ends with the same weights as an uninterrupted one.

Across processes (torchrun, :class:`~metareg.meta.distributed.World`): every process draws the whole
meta-batch from the same episode generator and adapts its contiguous share of the tasks; each
task's meta-gradient is gathered by every process and summed in task order, exactly the sum one
process accumulates, so every process takes the same clipped Adam step and holds identical
meta-parameters, and any number of processes gives one process's numbers (with the loop strategy
and deterministic methods bit for bit; stochastic perturbations draw their noise per process).
Only the first process writes the log and the checkpoints; a run resumes with any number of
processes.

MAML++'s epochs (:mod:`metareg.meta.schedule`): iteration i belongs to epoch ``i // train.epoch_steps``;
the learner is told its epoch before every iteration (multi-step loss, derivative-order annealing)
and ``train.lr_schedule: cosine`` sets the meta learning rate of the epoch. Both are functions of
the iteration, so a resumed run follows them exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch

from ..checkpoint import restore_rng, rng_tensors, state_to_tensors, tensors_to_state
from ..config import TrainConfig
from ..data.tasks import IndexedTaskSource, TaskBatch, TaskSource, on_device
from ..nets.modes import eval_mode, scheduled
from ..seeds import derive_seed, seeded
from .bilevel import BilevelLearner
from .graphs import CapturedStep, capture_or_none
from .logging import COLUMNS
from .loop import CheckpointedTrainer, RunContext, optimizer_tensors
from .schedule import cosine_learning_rate, epoch_of, epochs_in


class MetaTrainer(CheckpointedTrainer):
    """Meta-trains ``learner`` on tasks from ``source`` with the ``train`` section of a
    :class:`~metareg.config.Config`, writing everything to ``context.out``.

    ``validate(learner) -> (mean, ci95)`` is called every ``train.val_every`` steps if given.
    """

    def __init__(
        self,
        learner: BilevelLearner,
        source: TaskSource,
        train: TrainConfig,
        context: RunContext,
        *,
        validate: Callable[[BilevelLearner], tuple[float, float]] | None = None,
    ):
        super().__init__(context, train.steps, train.log_every, train.checkpoint_every)
        device = context.device
        self.learner = learner
        self.share = self.world.share(train.meta_batch)  # this process's tasks of every meta-batch
        # on a GPU, the images move there once and episodes are gathered there
        self.source = on_device(source, device)
        self.iterations = train.steps
        self.meta_batch = train.meta_batch
        self.clip = train.clip
        self.device = device
        self.dtype = context.dtype
        self.val_every = train.val_every
        self.validate = validate
        # capturable: Adam's step counts stay on the device (no host sync per step; CUDA-graph safe)
        self.optimizer = torch.optim.Adam(learner.parameters(), lr=train.lr, capturable=device.type == "cuda")
        self.epoch_steps, self.lr_schedule = train.epoch_steps, train.lr_schedule
        self.lr, self.min_lr = train.lr, train.min_lr
        self.cuda_graph = (
            train.cuda_graph
            and device.type == "cuda"
            and hasattr(self.source, "draw")
            and not scheduled(learner)
            and train.lr_schedule == "constant"  # a captured Adam step keeps its learning rate
            and not self.world.distributed
        )
        self.graph: CapturedStep | None = None
        self.seed = context.seed
        self.episodes = torch.Generator().manual_seed(context.seed)
        self._probe: TaskBatch | None = None
        self.last_val: tuple[float, float] | None = None

    # ------------------------------------------------------------------------------ persistence
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"param.{n}": p for n, p in self.learner.state_dict().items()}
        tensors |= rng_tensors({"episodes": self.episodes})
        optim = state_to_tensors("optim", self.optimizer.state_dict(), tensors)
        return tensors, {"optimizer": optim, "last_val": self.last_val}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        self.learner.load_state_dict(
            {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        )
        self.optimizer.load_state_dict(tensors_to_state(info["optimizer"], tensors))
        restore_rng(tensors, {"episodes": self.episodes})
        self.last_val = tuple(info["last_val"]) if info.get("last_val") else None

    def checked_tensors(self) -> list[torch.Tensor]:
        return list(self.learner.state_dict().values()) + optimizer_tensors(self.optimizer)

    def probe_loss(self) -> torch.Tensor:
        """The query loss after adapting to a fixed probe task with these weights (one sample, no meta-graph)."""
        if self._probe is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, 7))
            self._probe = self.source.sample(1, generator).to(self.device, self.dtype)
        with seeded(0, self.device), eval_mode(self.learner):
            out = self.learner.query_outputs(self._probe, steps=self.learner.inner_steps, samples=1)
        return self.learner.loss(out.flatten(0, 1), self._probe.query_y.flatten(0, 1))

    # ------------------------------------------------------------------------------------ loop
    def update(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """One meta-update on ``batch``: meta-backward, clip, Adam step. Fixed shapes and no host
        synchronization: on a GPU this (with the episode gather) is what is captured as a graph."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self._gathered_meta_backward(batch) if self.world.distributed else self.learner.meta_backward(batch)
        if self.clip is not None:
            torch.nn.utils.clip_grad_value_(self.learner.parameters(), self.clip)
        self.optimizer.step()
        return metrics

    def _gathered_meta_backward(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """This process's tasks' meta-gradients, gathered from every process and summed in task
        order into ``.grad`` (the same sum, bit for bit, as one process's accumulation)."""
        rows, used, metrics = self.learner.task_gradients(batch, total=self.meta_batch)
        rows = self.world.gather_tasks(rows)
        total = rows[0].clone()
        for row in rows[1:]:
            total += row
        offset = 0
        for p, got in zip([p for p in self.learner.parameters() if p.requires_grad], used):
            if got:
                p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        gathered = self.world.gather_tasks(torch.stack([metrics["loss"], metrics["score"]], 1))
        return {"loss": gathered[:, 0].mean(), "score": gathered[:, 1].mean()}

    def gathered_update(self, rows: torch.Tensor, turns: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`update` on the episodes of drawn indices, gathered on the device."""
        source = cast(IndexedTaskSource, self.source)  # with a CUDA graph only: a source that draws
        return self.update(source.gather(rows, turns).to(self.device, self.dtype))

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """Meta-iteration ``step`` (0-based): sample tasks, meta-backward, clip, Adam step (replayed
        as a captured CUDA graph where that is possible)."""
        self.learner.set_training_progress(step / max(self.iterations, 1))
        epoch = epoch_of(step, self.epoch_steps)
        self.learner.set_epoch(epoch)
        if self.lr_schedule == "cosine":
            rate = cosine_learning_rate(self.lr, self.min_lr, epoch, epochs_in(self.iterations, self.epoch_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = rate
        if not self.cuda_graph:
            # every process draws the whole meta-batch (the generator stays in step) and adapts its share
            return self.update(
                self.source.sample(self.meta_batch, self.episodes).tasks(self.share).to(self.device, self.dtype)
            )
        rows, turns = cast(IndexedTaskSource, self.source).draw(self.meta_batch, self.episodes)  # see cuda_graph
        if self.graph is None:
            self.graph = capture_or_none(
                self.gathered_update,
                (rows, turns),
                modules=[self.learner],
                optimizers=[self.optimizer],
                device=self.device,
            )
            if self.graph is None:
                self.cuda_graph = False
                return self.gathered_update(rows, turns)
        return self.graph(rows, turns)

    def run(self, resume_log: bool = False) -> dict[str, Any]:
        def validate(check: Callable[[BilevelLearner], tuple[float, float]]) -> dict[str, float]:
            self.last_val = check(self.learner)
            return {"val_score": self.last_val[0], "val_ci95": self.last_val[1]}

        self.run_steps(
            COLUMNS,
            evaluate=partial(validate, self.validate) if self.validate is not None else None,
            resume_log=resume_log,
            eval_every=self.val_every,
            shown=("loss", "score", "val_score"),
            per_step=self.meta_batch,
            desc="meta-train",
            hint="lower train.lr or inner.lr, or set train.clip",
            rate_column="tasks_per_s",
        )
        return {"step": self.step, "seconds": self.seconds, "last_val": self.last_val}
