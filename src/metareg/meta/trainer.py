"""The meta-training loop: sample tasks, meta-backward, clip, Adam step; log, validate, checkpoint.

Exact resume: a checkpoint holds the meta-parameters, the optimizer state, the step and every RNG
state (torch's global generator, which perturbations sample from, and the episode generator), so a
run killed and resumed on CPU ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    load_checkpoint,
    restore_rng,
    rng_tensors,
    save_checkpoint,
    state_to_tensors,
    tensors_to_state,
)
from ..data.tasks import TaskSource
from ..errors import CheckpointError, DivergenceError
from .bilevel import BilevelLearner
from .logging import MetricLog

CHECKPOINT = "checkpoint"


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
    ):
        self.learner = learner
        self.source = source
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
        self.optimizer = torch.optim.Adam(learner.parameters(), lr=meta_lr)
        self.episodes = torch.Generator().manual_seed(seed)
        self.step = 0
        self.seconds = 0.0  # training time before this process (resumed runs)
        self.last_val: tuple[float, float] | None = None

    # ------------------------------------------------------------------------------ persistence
    def save(self) -> Path:
        tensors = {f"param.{n}": p for n, p in self.learner.state_dict().items()}
        tensors |= rng_tensors({"episodes": self.episodes})
        optim = state_to_tensors("optim", self.optimizer.state_dict(), tensors)
        info = {"optimizer": optim, "seconds": self.seconds, "last_val": self.last_val} | self.meta
        return save_checkpoint(self.out, CHECKPOINT, tensors, info, self.step)

    def resume(self) -> None:
        tensors, meta = load_checkpoint(self.out, CHECKPOINT)
        params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        try:
            self.learner.load_state_dict(params)
            self.optimizer.load_state_dict(tensors_to_state(meta["optimizer"], tensors))
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint in {self.out} does not fit this model: {str(err).splitlines()[0]}") from None
        restore_rng(tensors, {"episodes": self.episodes})
        self.step = int(meta["step"])
        self.seconds = float(meta.get("seconds", 0.0))
        self.last_val = tuple(meta["last_val"]) if meta.get("last_val") else None

    # ------------------------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, torch.Tensor]:
        batch = self.source.sample(self.meta_batch, self.episodes).to(self.device, self.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.set_training_progress(self.step / max(self.iterations, 1))
        metrics = self.learner.meta_backward(batch)
        if self.clip is not None:
            torch.nn.utils.clip_grad_value_(self.learner.parameters(), self.clip)
        self.optimizer.step()
        return metrics

    def run(self, resume_log: bool = False) -> dict[str, Any]:
        log = MetricLog(self.out / "log.csv", resume_step=self.step if resume_log else None)
        running: list[dict[str, torch.Tensor]] = []
        start = time.perf_counter()
        base_seconds, first_step = self.seconds, self.step
        bar = tqdm(total=self.iterations, initial=self.step, desc="meta-train", unit="it", disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < self.iterations:
                running.append(self.train_step())
                self.step += 1
                self.seconds = base_seconds + time.perf_counter() - start
                bar.update(1)
                at_log = self.step % self.log_every == 0 or self.step == self.iterations
                at_val = self.validate is not None and (self.step % self.val_every == 0 or self.step == self.iterations)
                at_save = self.step % self.checkpoint_every == 0 or self.step == self.iterations
                if not (at_log or at_val or at_save):
                    continue
                # One host synchronization per logging period: the NaN check and the displayed
                # metrics. A non-finite loss stops the run before anything is saved.
                loss = torch.stack([m["loss"] for m in running]).mean().item()
                score = torch.stack([m["score"] for m in running]).mean().item()
                if not math.isfinite(loss):
                    raise DivergenceError(
                        f"meta-training loss became {loss} by step {self.step}; the last good checkpoint "
                        f"({self.out / (CHECKPOINT + '.json')}) is kept. Lower train.meta_lr or inner.lr, or set train.clip"
                    )
                row: dict[str, Any] = {"step": self.step, "loss": loss, "score": score, "seconds": round(self.seconds, 3)}
                row["tasks_per_s"] = self.meta_batch * (self.step - first_step) / max(self.seconds - base_seconds, 1e-9)
                if at_val:
                    self.last_val = self.validate(self.learner)
                    row["val_score"], row["val_ci95"] = self.last_val
                log.write(row)
                running.clear()
                postfix = {"loss": f"{loss:.3f}", "score": f"{score:.3f}"}
                if self.last_val:
                    postfix["val"] = f"{self.last_val[0]:.3f}"
                bar.set_postfix(postfix)
                if at_save:
                    self.save()
        finally:
            bar.close()
            log.close()
        return {"step": self.step, "seconds": self.seconds, "last_val": self.last_val}
