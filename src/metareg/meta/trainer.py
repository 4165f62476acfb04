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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    restore_rng,
    rng_tensors,
    save_checkpoint,
    state_to_tensors,
    tensors_to_state,
)
from ..data.tasks import TaskBatch, TaskSource, on_device
from ..errors import CheckpointError
from ..nets.modes import eval_mode, scheduled
from ..seeds import derive_seed, seeded
from .bilevel import BilevelLearner
from .distributed import World
from .graphs import CapturedStep, capture_or_none
from .logging import COLUMNS
from .loop import StepLoop, checkpoint_problem, nonfinite_count, optimizer_tensors


class MetaTrainer:
    """Meta-trains ``learner`` on tasks from ``source``, writing everything to ``out``.

    ``validate(learner) -> (mean, ci95)`` is called every ``val_every`` steps if given.
    ``meta`` is JSON-able run information stored in every checkpoint (the resolved config).
    """

    def __init__(
        self,
        learner: BilevelLearner,
        source: TaskSource,
        *,
        out: str | Path,
        iterations: int,
        meta_batch: int,
        meta_lr: float,
        clip: float | None,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        log_every: int = 10,
        checkpoint_every: int = 100,
        val_every: int = 500,
        validate: Callable[[BilevelLearner], tuple[float, float]] | None = None,
        meta: dict[str, Any] | None = None,
        progress: bool = True,
        cuda_graph: bool = True,
        deadline: float | None = None,
        world: World | None = None,
    ):
        self.learner = learner
        self.world = world or World(device=device)
        self.share = self.world.share(meta_batch)  # this process's tasks of every meta-batch
        self.source = on_device(source, device)  # on a GPU, the images move there once and episodes are gathered there
        self.out = Path(out)
        self.iterations = iterations
        self.meta_batch = meta_batch
        self.clip = clip
        self.device = device
        self.dtype = dtype
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.val_every = val_every
        self.validate = validate
        self.meta = meta or {}
        self.progress = progress
        # capturable: Adam's step counts stay on the device (no host sync per step; CUDA-graph safe)
        self.optimizer = torch.optim.Adam(learner.parameters(), lr=meta_lr, capturable=device.type == "cuda")
        self.cuda_graph = (
            cuda_graph
            and device.type == "cuda"
            and hasattr(self.source, "draw")
            and not scheduled(learner)
            and not self.world.distributed
        )
        self.graph: CapturedStep | None = None
        self.deadline = deadline
        self.finished = False
        self.seed = seed
        self.episodes = torch.Generator().manual_seed(seed)
        self._probe: TaskBatch | None = None
        self.step = 0
        self.seconds = 0.0  # training time before this process (resumed runs)
        self.last_val: tuple[float, float] | None = None

    # ------------------------------------------------------------------------------ persistence
    def save(self) -> Path | None:
        if not self.world.is_main:
            return None
        tensors = {f"param.{n}": p for n, p in self.learner.state_dict().items()}
        tensors |= rng_tensors({"episodes": self.episodes})
        optim = state_to_tensors("optim", self.optimizer.state_dict(), tensors)
        info = {
            "optimizer": optim,
            "seconds": self.seconds,
            "last_val": self.last_val,
            "processes": self.world.size,
        } | self.meta
        return save_checkpoint(self.out, CHECKPOINT, tensors, info, self.step)

    def resume(self) -> None:
        tensors, meta = load_checkpoint(self.out, CHECKPOINT)
        params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        try:
            self.learner.load_state_dict(params)
            self.optimizer.load_state_dict(tensors_to_state(meta["optimizer"], tensors))
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint in {self.out} does not fit this model: {str(err).splitlines()[0]}"
            ) from None
        restore_rng(tensors, {"episodes": self.episodes})
        self.step = int(meta["step"])
        self.seconds = float(meta.get("seconds", 0.0))
        self.last_val = tuple(meta["last_val"]) if meta.get("last_val") else None

    def check(self) -> str | None:
        """None if the state about to be saved is good: every tensor finite, and a finite query loss
        after adapting to a fixed probe task with these weights (one sample, no meta-graph)."""
        bad = int(nonfinite_count(list(self.learner.state_dict().values()) + optimizer_tensors(self.optimizer)))
        loss = float("nan")
        if not bad:
            if self._probe is None:
                self._probe = self.source.sample(1, torch.Generator().manual_seed(derive_seed(self.seed, 7))).to(
                    self.device, self.dtype
                )
            with seeded(0, self.device), eval_mode(self.learner):
                out = self.learner.query_outputs(self._probe, steps=self.learner.inner_steps, samples=1)
            loss = self.learner.loss(out.flatten(0, 1), self._probe.query_y.flatten(0, 1)).item()
        return checkpoint_problem(bad, loss)

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
        return self.update(self.source.gather(rows, turns).to(self.device, self.dtype))

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """Meta-iteration ``step`` (0-based): sample tasks, meta-backward, clip, Adam step (replayed
        as a captured CUDA graph where that is possible)."""
        self.learner.set_training_progress(step / max(self.iterations, 1))
        if (
            not self.cuda_graph
        ):  # (every process draws the whole meta-batch: the generator stays in step; it adapts its share)
            return self.update(
                self.source.sample(self.meta_batch, self.episodes).tasks(self.share).to(self.device, self.dtype)
            )
        rows, turns = self.source.draw(self.meta_batch, self.episodes)
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
        def validate() -> dict[str, float]:
            self.last_val = self.validate(self.learner)
            return {"val_score": self.last_val[0], "val_ci95": self.last_val[1]}

        loop = StepLoop(
            self.out,
            self.iterations,
            self.log_every,
            self.checkpoint_every,
            COLUMNS,
            eval_every=self.val_every,
            shown=("loss", "score", "val_score"),
            per_step=self.meta_batch,
            desc="meta-train",
            progress=self.progress,
            hint="lower train.meta_lr or inner.lr, or set train.clip",
            rate_column="tasks_per_s",
            deadline=self.deadline,
            record=self.world.is_main,
            agree=(lambda late: bool(self.world.all_reduce_sum(torch.tensor([float(late)], device=self.device)).item()))
            if self.world.distributed
            else None,
        )
        self.finished = loop.run(
            self.train_step, self, evaluate=validate if self.validate is not None else None, resume_log=resume_log
        )
        return {"step": self.step, "seconds": self.seconds, "last_val": self.last_val}
