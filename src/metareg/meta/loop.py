"""The step loop every trainer runs: step, and periodically log, evaluate and checkpoint.

A step returns its metrics as tensors (no host synchronization); once per logging period they are
averaged and read (the only sync), a row goes to the CSV log, and the progress display shows ETA
and the live metrics.

Divergence never reaches the disk. A non-finite loss stops the run before anything is saved; and a
checkpoint is written only once its weights are known to be good: every tensor it holds (weights,
buffers, optimizer state) is finite and a loss computed with these weights (the trainer's
``check()``, on a fixed probe batch) is finite. So the checkpoint a diverged run leaves behind is
always one that evaluates to finite numbers, and the message says which one it is (or that none
was written).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import describe_kept
from ..errors import DivergenceError
from ..progress import Progress
from .logging import MetricLog


def nonfinite_count(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """How many floating-point entries of ``tensors`` are NaN or infinite (a 0-dim tensor on the
    tensors' device: no host synchronization)."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.zeros((), dtype=torch.long)
    return sum((~torch.isfinite(t)).sum() for t in floats)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of an optimizer's state (Adam's moments and step counts)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def checkpoint_problem(nonfinite: int, loss: float) -> str | None:
    """What is wrong with a state about to be checkpointed, or None if it is good."""
    if nonfinite:
        return f"the weights or optimizer state hold {nonfinite} non-finite values"
    if not math.isfinite(loss):
        return f"the loss on the new weights is {loss}"
    return None


@dataclass
class StepLoop:
    """``total`` steps with a log row every ``log_every``, ``evaluate()`` every ``eval_every`` and a
    checkpoint every ``checkpoint_every`` steps (and at the end). ``columns``: the CSV columns;
    ``shown``: the metrics on the progress display; ``per_step``: examples (or tasks) per step, for
    the throughput column ``rate_column``; ``hint``: what to do when the loss diverges; ``record``:
    write the CSV log and show progress (only one process of a distributed run does)."""

    out: Path
    total: int
    log_every: int
    checkpoint_every: int
    columns: Sequence[str]
    eval_every: int | None = None
    shown: Sequence[str] = ("loss",)
    per_step: int = 1
    desc: str = "train"
    progress: bool = True
    hint: str = "lower the learning rate"
    rate_column: str = "per_s"
    record: bool = True
    deadline: float | None = None  # time.monotonic() after which the run stops at the next step, with a checkpoint
    agree: Callable[[bool], bool] | None = (
        None  # every process's verdict on the deadline (a distributed run stops together)
    )

    def diverged(self, what: str, step: int) -> DivergenceError:
        return DivergenceError(
            f"{what} by step {step}; {describe_kept(self.out)}. {self.hint[0].upper() + self.hint[1:]}"
        )

    def run(
        self,
        step: Callable[[int], dict[str, torch.Tensor]],
        trainer: Any,
        *,
        evaluate: Callable[[], dict[str, float]] | None = None,
        resume_log: bool = False,
    ) -> bool:
        """Run ``trainer`` from its ``step`` (with ``seconds`` of earlier training) to ``total``.
        ``step(i)`` takes step i (0-based); at every checkpoint ``trainer.step`` and
        ``trainer.seconds`` are brought up to date, ``trainer.check()`` must find the state good
        (it returns ``None`` or what is wrong) and ``trainer.save()`` is called. Past the
        ``deadline`` the loop stops at the next step boundary with a checkpoint (the run resumes
        from it exactly); returns whether all ``total`` steps were done."""
        start, seconds = trainer.step, trainer.seconds
        log = (
            MetricLog(self.out / "log.csv", resume_step=start if resume_log else None, columns=list(self.columns))
            if self.record
            else None
        )
        pending: list[dict[str, torch.Tensor]] = []
        clock, base, done = time.perf_counter(), seconds, start
        last_eval: dict[str, float] = {}
        bar = Progress(self.total, initial=start, desc=self.desc, enabled=self.progress and self.record)
        try:
            while done < self.total:
                try:
                    pending.append(step(done))
                except RuntimeError as err:  # Adam's update overflowing the parameters' dtype
                    if "overflow" not in str(err):
                        raise
                    raise self.diverged(f"the update overflowed ({str(err).splitlines()[0]})", done + 1) from None
                done += 1
                seconds = base + time.perf_counter() - clock
                bar.update(1)
                final = done == self.total
                out_of_time = not final and self.deadline is not None and time.monotonic() >= self.deadline
                if self.deadline is not None and self.agree is not None:
                    out_of_time = not final and self.agree(out_of_time)
                at_log = done % self.log_every == 0 or final or out_of_time
                at_eval = evaluate is not None and (done % (self.eval_every or self.total) == 0 or final)
                at_save = done % self.checkpoint_every == 0 or final or out_of_time
                if not (at_log or at_eval or at_save):
                    continue
                means = {k: torch.stack([m[k].detach().float() for m in pending]).mean().item() for k in pending[0]}
                pending.clear()
                bad = {k: v for k, v in means.items() if "loss" in k and not math.isfinite(v)}
                if bad:
                    name, value = next(iter(bad.items()))
                    raise self.diverged(f"{name} became {value}", done)
                row: dict[str, Any] = {
                    "step": done,
                    **means,
                    "seconds": round(seconds, 3),
                    self.rate_column: self.per_step * (done - start) / max(seconds - base, 1e-9),
                }
                if at_eval:
                    last_eval = evaluate()
                    row |= last_eval
                if log is not None:
                    log.write(row)
                bar.metrics({k: v for k, v in (means | last_eval).items() if k in self.shown})
                if at_save:
                    trainer.step, trainer.seconds = done, seconds
                    problem = trainer.check()
                    if problem:
                        raise self.diverged(problem, done)
                    trainer.save()
                if out_of_time:
                    return False
            return True
        finally:
            bar.close()
            if log is not None:
                log.close()
