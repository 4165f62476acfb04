"""What the seed tables' runs cost: seconds per training iteration *measured* on this project's
machine, FLOPs per iteration *counted* there, and a GPU time *estimated* from the FLOPs.

:data:`MEASURED` is data, written from the output of ``python benchmarks/seed_costs.py`` (which
times each entry's representative preset for a few iterations through the real trainers, with
``torch.utils.flop_counter.FlopCounterMode`` around one of them). Presets and ``metareg reproduce
--plan`` name an entry; nothing here is guessed except the GPU figure, which is labelled an
estimate everywhere it is shown: counted FLOPs / :data:`GPU_TFLOPS`, at least :data:`GPU_FLOOR_S`
per iteration (small episodic batches are bound by kernel launches, not arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Cost:
    cpu_seconds: float  # measured seconds per training iteration on MACHINE
    gflop: float  # counted GFLOP per iteration (forward and backward, all tasks of the meta-batch)
    what: str  # what was timed: the preset and its overrides


#: Where MEASURED was measured: one thread, as each run of ``metareg reproduce --jobs 2`` gets one.
MACHINE = "one CPU thread (this project's shared 2-core machine; torch 2.13, float32)"
#: Assumed sustained throughput of one H100/H200 on these networks (TF32 convolutions): an assumption.
GPU_TFLOPS = 20.0
#: Assumed least time of one iteration on a GPU (launch-bound small kernels): an assumption.
GPU_FLOOR_S = 0.05

#: Measured by ``python benchmarks/seed_costs.py`` (see its docstring for the date and load).
MEASURED: dict[str, Cost] = {}


def cost(key: str) -> Cost:
    if key not in MEASURED:
        raise ConfigError(f"no measured cost {key!r}; run benchmarks/seed_costs.py and record it in metareg.runs.costs")
    return MEASURED[key]


def gpu_seconds(entry: Cost) -> float:
    """The GPU estimate of one iteration (not a measurement): counted FLOPs at GPU_TFLOPS, floored."""
    return max(entry.gflop / (GPU_TFLOPS * 1e3), GPU_FLOOR_S)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.0f} min"


def describe(key: str, iterations: int) -> str:
    """One line: what ``iterations`` iterations cost here (measured rate) and on a GPU (estimate)."""
    entry = cost(key)
    return (
        f"{iterations} iterations: {hours(iterations * entry.cpu_seconds)} on {MACHINE.split(' (')[0]} here "
        f"(measured {entry.cpu_seconds:.2f} s/iteration); ~{hours(iterations * gpu_seconds(entry))} on one GPU "
        f"(estimate, not measured: {entry.gflop:.0f} GFLOP/iteration at {GPU_TFLOPS:g} TFLOP/s)"
    )
