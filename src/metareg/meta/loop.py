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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from ..checkpoint import CHECKPOINT, describe_kept, load_checkpoint, record_step, save_checkpoint
from ..errors import CheckpointError, DivergenceError, one_line
from ..progress import Progress
from .distributed import World
from .logging import MetricLog


def nonfinite_count(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """How many floating-point entries of ``tensors`` are NaN or infinite (a 0-dim tensor on the
    tensors' device: no host synchronization)."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.zeros((), dtype=torch.long)
    return cast(torch.Tensor, sum((~torch.isfinite(t)).sum() for t in floats))  # a tensor: floats is not empty


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of an optimizer's state (Adam's moments and step counts)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def optimizer_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """What is wrong with an optimizer's state as loaded from a checkpoint (None if nothing): a
    moment whose shape is not its parameter's, a non-finite value, a negative second moment, or a
    step count that is not a whole number >= 0 (Adam's bias correction would turn it into a complex
    number or a division by zero)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    count = value.detach().double().flatten()
                    if count.numel() != 1 or not math.isfinite(count.item()) or count.item() < 0:
                        return f"an optimizer step count is {count.tolist()}, not a whole number >= 0"
                    if count.item() != round(count.item()):
                        return f"an optimizer step count is {count.item()}, not a whole number"
                elif value.shape != param.shape:
                    return f"optimizer state {key!r} has shape {list(value.shape)}, its parameter {list(param.shape)}"
                elif value.is_floating_point() and not torch.isfinite(value).all():
                    return f"optimizer state {key!r} holds non-finite values"
                elif key in ("exp_avg_sq", "max_exp_avg_sq") and (value < 0).any():
                    return f"optimizer state {key!r} holds negative second moments"
    return None


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
                if at_eval and evaluate is not None:
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


# ---------------------------------------------------------------------------------- trainers
@dataclass
class RunContext:
    """Where and how a trainer runs, the same for every kind: the run folder, the run's seed, the
    device and dtype, the processes (:class:`~metareg.meta.distributed.World`), the JSON stored in
    every checkpoint (``meta``: the resolved config, the kind, the command), progress display and
    the ``deadline`` (``time.monotonic()``) of a time-budgeted run."""

    out: Path
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    world: World = None  # type: ignore[assignment]  # (__post_init__: one process on ``device``)
    meta: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    deadline: float | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.world = self.world or World(device=self.device)


class Trainer(Protocol):
    """What :class:`StepLoop` drives: ``train_step(i)`` returns the step's metrics as tensors;
    ``check()`` says what is wrong with the state about to be saved (or None); ``save()`` writes
    the checkpoint (``step`` and ``seconds`` are brought up to date before); ``resume()`` reads it."""

    step: int
    seconds: float
    finished: bool

    def train_step(self, step: int) -> dict[str, Tensor]: ...

    def check(self) -> str | None: ...

    def save(self) -> Path | None: ...

    def resume(self) -> None: ...


class CheckpointedTrainer:
    """The one checkpoint, resume and check implementation of every trainer.

    A trainer says what its state is (:meth:`state_tensors`: tensors and JSON), how to load it back
    (:meth:`load_state`), which tensors must be finite (:meth:`checked_tensors`) and which loss its
    weights must give finitely on a fixed probe batch (:meth:`probe_loss`); this class writes and
    reads the checkpoint (safetensors + JSON, atomically, only on the first process), refuses a
    checkpoint that does not fit with one line, and agrees the check across processes."""

    context: RunContext
    total: int  # the steps of the whole run
    log_every: int
    checkpoint_every: int

    def __init__(self, context: RunContext, total: int, log_every: int, checkpoint_every: int):
        self.context, self.total, self.log_every, self.checkpoint_every = context, total, log_every, checkpoint_every
        self.step, self.seconds, self.finished = 0, 0.0, False

    @property
    def out(self) -> Path:
        return self.context.out

    @property
    def world(self) -> World:
        return self.context.world

    # What each trainer provides.
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The state to checkpoint: tensors, and JSON-able information (collective in a distributed run)."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        """Load :meth:`state_tensors`' output back (raise KeyError/ValueError/RuntimeError if it does not fit)."""
        raise NotImplementedError

    def checked_tensors(self) -> list[Tensor]:
        """Every tensor of the state that must be finite before it is saved (weights, buffers, optimizer state)."""
        raise NotImplementedError

    def probe_loss(self) -> Tensor:
        """A loss of the current weights on a fixed batch, without changing any state (0-dim tensor)."""
        raise NotImplementedError

    # The shared implementation.
    def save(self) -> Path | None:
        tensors, info = self.state_tensors()
        if not self.world.is_main:
            return None
        info = info | {"seconds": self.seconds, "processes": self.world.size} | self.context.meta
        return save_checkpoint(self.out, CHECKPOINT, tensors, info, self.step)

    def resume(self) -> None:
        """Load the run folder's checkpoint; a checkpoint that does not fit this run, or whose state
        is damaged (a checksum recomputed over edited tensors: non-finite weights, an optimizer
        state no optimizer could have written, RNG states of the wrong size), is one line."""
        tensors, meta = load_checkpoint(self.out, CHECKPOINT)
        step = checked_step(meta, self.out)
        try:
            self.load_state(tensors, meta)
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint in {self.out} does not fit this run: {one_line(err)}") from None
        optimizers = [v for v in vars(self).values() if isinstance(v, torch.optim.Optimizer)]
        problem = next((found for o in optimizers if (found := optimizer_problem(o))), None)
        if problem is None and nonfinite_count(self.checked_tensors()).item():
            problem = "its weights or optimizer state hold non-finite values"
        if problem is not None:
            raise CheckpointError(f"checkpoint in {self.out} is damaged: {problem}; restore it or start a new run")
        try:
            seconds = float(meta.get("seconds") or 0.0)
        except (TypeError, ValueError):
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise CheckpointError(f"checkpoint in {self.out} is damaged: its training time is {meta.get('seconds')!r}")
        self.step, self.seconds = step, seconds

    def check(self) -> str | None:
        """None if the state about to be saved is good on every process: every tensor finite and a
        finite probe loss (collective in a distributed run)."""
        bad = nonfinite_count(self.checked_tensors()).to(self.context.device)
        loss = self.probe_loss().detach().double() if not bad.item() else torch.tensor(math.nan, dtype=torch.float64)
        both = self.world.all_reduce_sum(torch.stack([bad.double(), loss.to(bad.device)]))
        return checkpoint_problem(int(both[0].item()), both[1].item())

    def run_steps(
        self,
        columns: Sequence[str],
        *,
        evaluate: Callable[[], dict[str, float]] | None = None,
        resume_log: bool = False,
        **options: Any,
    ) -> bool:
        """Run the :class:`StepLoop` of this run from :attr:`step` to :attr:`total` (``options``: its
        display, throughput and evaluation settings); sets and returns :attr:`finished`."""
        world = self.world
        loop = StepLoop(
            self.out,
            self.total,
            self.log_every,
            self.checkpoint_every,
            columns,
            progress=self.context.progress and world.is_main,
            record=world.is_main,
            deadline=self.context.deadline,
            agree=(
                (lambda late: bool(world.all_reduce_sum(torch.tensor([float(late)], device=world.device)).item()))
                if world.distributed
                else None
            ),
            **options,
        )
        self.finished = loop.run(self.train_step, self, evaluate=evaluate, resume_log=resume_log)
        return self.finished

    def train_step(self, step: int) -> dict[str, Tensor]:
        raise NotImplementedError


def checked_step(meta: dict[str, Any], out: Path) -> int:
    """The step a checkpoint record holds: a whole number >= 0, else the record is damaged."""
    return record_step(meta, out / f"{CHECKPOINT}.json")
