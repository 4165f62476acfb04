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

#: Measured by ``python benchmarks/seed_costs.py`` (see its docstring), one thread per run as
#: ``metareg reproduce --jobs 2`` gives each: the first 9 entries 3 iterations each (2026-11-30 01:01,
#: 1-minute load average 1.1 to 2.7), the ResNet entries 2 iterations each (2026-11-30 01:41 and
#: later, load 2.0 to 4.0). The machine was shared with other runs, so these rates are upper bounds:
#: resnet18-5w5s-7steps, measured at the highest load, is about 2x what 5 vs 3 steps suggests.
MEASURED: dict[str, Cost] = {
    "mamlpp-omniglot-20w1s": Cost(5.41, 184.9, "omniglot-20w1s-mamlpp, 3 iterations, 1 thread(s)"),
    "mtnet-omniglot-5w1s": Cost(0.68, 13.6, "mtnet-omniglot-5w1s-mtnet, 3 iterations, 1 thread(s)"),
    "mtnet-omniglot-20w1s": Cost(0.86, 27.3, "mtnet-omniglot-20w1s-mtnet, 3 iterations, 1 thread(s)"),
    "mtnet-miniimagenet-5w1s": Cost(6.31, 118.7, "mtnet-miniimagenet-5w1s-mtnet, 3 iterations, 1 thread(s)"),
    "mamlpp-miniimagenet-5w1s": Cost(36.83, 580.3, "miniimagenet-5w1s-mamlpp, 3 iterations, 1 thread(s)"),
    "mamlpp-miniimagenet-5w5s": Cost(27.46, 480.5, "miniimagenet-5w5s-mamlpp, 3 iterations, 1 thread(s)"),
    "metaperturb-transfer-resnet20-32": Cost(1.57, 33.4, "transfer-scifar100, 3 iterations, 1 thread(s)"),
    "metaperturb-transfer-resnet20-84": Cost(11.56, 230.5, "transfer-cub, 3 iterations, 1 thread(s)"),
    "metaperturb-meta-train-resnet20": Cost(41.09, 877.4, "perturb-tinyimagenet-resnet20, 3 iterations, 1 thread(s)"),
    "resnet12-5w1s": Cost(560.58, 14712.2, "miniimagenet-5w1s-resnet12, 2 iterations, 1 thread(s)"),
    "resnet18-pretrain": Cost(3.38, 170.3, "dropgrad-pretrain-resnet18, 2 iterations, 1 thread(s)"),
    "resnet18-5w1s": Cost(113.69, 4258.1, "dropgrad-maml-5w1s-dropgrad, 2 iterations, 1 thread(s)"),
    "resnet18-5w5s": Cost(151.68, 8516.3, "dropgrad-maml-5w5s-dropgrad, 2 iterations, 1 thread(s)"),
    "resnet18-5w1s-metasgd": Cost(107.80, 4258.1, "dropgrad-metasgd-5w1s-dropgrad, 2 iterations, 1 thread(s)"),
    "resnet18-5w5s-metasgd": Cost(182.39, 8516.3, "dropgrad-metasgd-5w5s-dropgrad, 2 iterations, 1 thread(s)"),
    "resnet18-5w5s-3steps": Cost(108.35, 6387.2, "dropgrad-maml-5w5s-n3-dropgrad, 2 iterations, 1 thread(s)"),
    "resnet18-5w5s-7steps": Cost(360.81, 10645.4, "dropgrad-maml-5w5s-n7-dropgrad, 2 iterations, 1 thread(s)"),
}


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
