"""The ``parallel`` strategy: a meta-batch's tasks computed by several single-threaded processes on a CPU.

On a CPU the per-task loop uses the cores through intra-op threads only, and the small kernels of a
few-shot task scale poorly with them (a 20-way Conv4 task on 2 cores: measured in ``metareg
bench``). Here ``workers`` processes (this one and ``workers - 1`` helpers forked from it) each run
a contiguous share of the tasks with one intra-op thread, as the ``loop`` strategy runs one task;
every task's meta-gradient comes back as a row, and the rows are summed in task order into
``.grad``: the sum the loop accumulates, whichever process computed a row (equal up to the float
round-off of one thread against several inside a kernel).

The helpers are forked once, at the first meta-batch, after the meta-parameters were moved to
shared memory: the optimizer's in-place steps (and a resume's ``load_state_dict``) reach them
without copies. Each meta-batch sends a helper its tasks (tensors through shared memory), the
module's mode, training progress and epoch, and one seed per task.

Random numbers: a forked helper has its own copy of torch's generator, so each task's noise comes
from its own seed, drawn from the main process's generator (which the checkpoint keeps): a run is
reproducible, resumes exactly and does not depend on the number of workers; its noise is not the
``loop`` strategy's single stream (deterministic models get the same meta-gradient either way).

Why processes and not threads: ``torch.func.functional_call`` swaps a module's parameters in place,
so two threads adapting the same model interfere; and threads share torch's global generator, so
the order in which two tasks draw their noise would change from run to run.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import traceback
import weakref
from typing import Any, Protocol, cast

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from ..data.tasks import TaskBatch
from ..errors import ConfigError, DistributedError
from ..nets.modes import set_training_progress


class _TaskGradients(Protocol):
    """What the pool asks of its learner (a :class:`~metareg.meta.bilevel.BilevelLearner`, which
    this module cannot import: the learner imports the pool)."""

    def set_epoch(self, epoch: int) -> None: ...

    def task_gradients(
        self, batch: TaskBatch, total: int, seeds: list[int] | None = None
    ) -> tuple[Tensor, list[bool], dict[str, Tensor]]: ...


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def shares(num_tasks: int, workers: int) -> list[range]:
    """Contiguous shares of the tasks, as even as possible, the first one the largest."""
    base, extra = divmod(num_tasks, workers)
    out, start = [], 0
    for w in range(workers):
        size = base + (w < extra)
        out.append(range(start, start + size))
        start += size
    return [r for r in out if len(r)]


def _serve(learner: nn.Module, conn: multiprocessing.connection.Connection) -> None:
    """A helper: one intra-op thread; answers each request with its tasks' gradient rows."""
    torch.set_num_threads(1)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        batch, seeds, total, training, progress, epoch = request
        try:
            learner.train(training)
            set_training_progress(learner, progress)
            tasks = cast(_TaskGradients, learner)
            tasks.set_epoch(epoch)
            rows, used, metrics = tasks.task_gradients(batch, total, seeds=seeds)
            conn.send(("ok", rows, used, metrics))
        except Exception as err:  # reported to the main process, which raises it
            conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(limit=3)))


def _stop(processes: list, connections: list, owner: int | None = None) -> None:
    """Stop the helpers; only in the process that started them (``owner``): a process forked later
    (another pool's helper) inherits this pool's finalizer and must leave them alone."""
    if owner is not None and owner != os.getpid():
        return
    for conn in connections:
        try:
            conn.send(None)
            conn.close()
        except (OSError, ValueError):
            pass
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


class TaskPool:
    """``workers`` processes (this one included) computing the tasks of each meta-batch."""

    def __init__(self, learner: nn.Module, workers: int):
        if workers < 2:
            raise ConfigError(f"the parallel strategy needs at least 2 workers, got {workers}")
        self.learner = learner
        self.workers = workers
        self.processes: list = []
        self.connections: list = []
        self.progress = 1.0
        self.epoch = 0  # MAML++'s schedules follow the epoch

    def start(self) -> None:
        if self.processes:
            return
        if any(p.device.type != "cpu" for p in self.learner.parameters()):
            raise ConfigError("the parallel strategy runs on the CPU; on a GPU use train.strategy=vmap or loop")
        self.learner.share_memory()
        context = mp.get_context("fork")
        for _ in range(self.workers - 1):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(self.learner, theirs), daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.connections.append(ours)
        weakref.finalize(self, _stop, self.processes, self.connections, os.getpid())

    def close(self) -> None:
        _stop(self.processes, self.connections)
        self.processes, self.connections = [], []

    def task_gradients(self, batch: TaskBatch, total: int, seeds: list[int]) -> tuple[list, list[bool], dict]:
        """Every task's gradient row (in task order), which parameters got one, and the metrics."""
        self.start()
        parts = shares(batch.num_tasks, self.workers)
        for process, conn, share in zip(self.processes, self.connections, parts[1:]):
            request = (
                batch.tasks(share),
                seeds[share.start : share.stop],
                total,
                self.learner.training,
                self.progress,
                self.epoch,
            )
            try:
                conn.send(request)
            except OSError:  # the helper is gone (a broken pipe)
                raise _stopped(process) from None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = [
                cast(_TaskGradients, self.learner).task_gradients(
                    batch.tasks(parts[0]), total, seeds=seeds[: parts[0].stop]
                )
            ]
        finally:
            torch.set_num_threads(threads)
        for process, conn in zip(self.processes[: len(parts) - 1], self.connections):
            results.append(self._receive(process, conn))
        used = [any(r[1][j] for r in results) for j in range(len(results[0][1]))]
        metrics = {k: torch.cat([r[2][k] for r in results]) for k in results[0][2]}
        return [r[0] for r in results], used, metrics

    @staticmethod
    def _receive(process: Any, conn: multiprocessing.connection.Connection) -> tuple:
        multiprocessing.connection.wait([conn, process.sentinel])
        if not conn.poll():
            raise _stopped(process)
        answer = conn.recv()
        if answer[0] == "error":
            raise RuntimeError(f"a helper process of the parallel strategy failed: {answer[1]}\n{answer[2]}")
        return answer[1:]


def _stopped(process: Any) -> DistributedError:
    process.join(timeout=1)
    return DistributedError(
        f"a helper process of the parallel strategy stopped (exit code {process.exitcode}); "
        "continue from the last checkpoint with --resume, or use train.strategy=loop"
    )


def accumulate(params: list[torch.Tensor], rows: list[torch.Tensor], used: list[bool]) -> None:
    """Add the rows' sum, in row order, into the ``.grad`` of ``params`` that got a gradient."""
    flat = torch.cat(rows)
    total = flat[0].clone()
    for row in flat[1:]:
        total += row
    offset = 0
    for p, got in zip(params, used):
        if got:
            part = total[offset : offset + p.numel()].view_as(p)
            p.grad = part.clone() if p.grad is None else p.grad + part
        offset += p.numel()
