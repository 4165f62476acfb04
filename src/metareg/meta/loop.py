"""The step loop every trainer runs: step, and periodically log, evaluate and checkpoint.

A step returns its metrics as tensors (no host synchronization); once per logging period they are
averaged and read (the only sync), a non-finite loss stops the run before anything is saved
(the last good checkpoint stays), a row goes to the CSV log, and the progress bar shows ETA and the
live metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DivergenceError
from .logging import MetricLog


@dataclass
class StepLoop:
    """``total`` steps with a log row every ``log_every``, ``evaluate()`` every ``eval_every`` and
    ``save()`` every ``checkpoint_every`` steps (and at the end). ``columns``: the CSV columns;
    ``shown``: the metrics on the progress bar; ``per_step``: examples (or tasks) per step, for the
    throughput column ``rate_column``; ``hint``: what to do when the loss diverges; ``record``:
    write the CSV log (only one process of a distributed run does)."""

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

    def run(self, step: Callable[[int], dict[str, torch.Tensor]], trainer: Any, *,
            evaluate: Callable[[], dict[str, float]] | None = None, resume_log: bool = False) -> None:
        """Run ``trainer`` from its ``step`` (with ``seconds`` of earlier training) to ``total``.
        ``step(i)`` takes step i (0-based); at every checkpoint ``trainer.step`` and
        ``trainer.seconds`` are brought up to date and ``trainer.save()`` is called."""
        start, seconds = trainer.step, trainer.seconds
        log = MetricLog(self.out / "log.csv", resume_step=start if resume_log else None, columns=list(self.columns)) if self.record else None
        pending: list[dict[str, torch.Tensor]] = []
        clock, base, done = time.perf_counter(), seconds, start
        last_eval: dict[str, float] = {}
        bar = tqdm(total=self.total, initial=start, desc=self.desc, unit="it", disable=not self.progress, dynamic_ncols=True)
        try:
            while done < self.total:
                pending.append(step(done))
                done += 1
                seconds = base + time.perf_counter() - clock
                bar.update(1)
                final = done == self.total
                at_log = done % self.log_every == 0 or final
                at_eval = evaluate is not None and (done % (self.eval_every or self.total) == 0 or final)
                at_save = done % self.checkpoint_every == 0 or final
                if not (at_log or at_eval or at_save):
                    continue
                means = {k: torch.stack([m[k].detach().float() for m in pending]).mean().item() for k in pending[0]}
                pending.clear()
                bad = {k: v for k, v in means.items() if "loss" in k and not math.isfinite(v)}
                if bad:
                    name, value = next(iter(bad.items()))
                    raise DivergenceError(f"{name} became {value} by step {done}; the last good checkpoint "
                                          f"({self.out / 'checkpoint.json'}) is kept. {self.hint[0].upper() + self.hint[1:]}")
                row: dict[str, Any] = {"step": done, **means, "seconds": round(seconds, 3),
                                       self.rate_column: self.per_step * (done - start) / max(seconds - base, 1e-9)}
                if at_eval:
                    last_eval = evaluate()
                    row |= last_eval
                if log is not None:
                    log.write(row)
                bar.set_postfix({k: f"{v:.3f}" for k, v in (means | last_eval).items() if k in self.shown})
                if at_save:
                    trainer.step, trainer.seconds = done, seconds
                    trainer.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
