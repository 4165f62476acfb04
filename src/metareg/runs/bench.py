"""``metareg bench``: meta-training throughput of the engine against a plain per-task loop.

Shapes (``--shape``): ``omniglot-20w1s`` (default: 20-way 1-shot, 15 queries per class, 28x28
grayscale, Conv4-64) and ``miniimagenet-5w1s`` (5-way 1-shot, 15 queries, 84x84 RGB, Conv4-32), both
with 5 inner SGD steps, second order, meta-batch 4, as the presets. The inputs are random images
from a fixed seed: speed does not depend on the pixels, and the bench needs no data set. On CUDA
(``--device cuda``) both shapes are measured unless one is named.

Each implementation runs in a fresh subprocess, so its peak memory is its own and process-level
settings do not leak between them:
- ``reference``: ``metareg.meta.reference.reference_meta_gradient``, a plain loop with
  ``torch.autograd.grad(create_graph=True)`` and a backward after each task, default allocator;
- ``reference+alloc``: the same loop with ``metareg.runtime.keep_freed_memory()`` (what the engine's
  command line sets), to show how much of the engine's gain is that process-level setting;
- ``engine``: ``BilevelLearner.meta_backward`` with the strategy used on this device, as
  ``metareg train`` runs it (allocator setting on);
- ``engine-vmap``: the ``vmap`` strategy (tasks batched);
- ``engine-graph`` (CUDA only): the engine's loop captured once as a CUDA graph and replayed
  (``metareg.meta.graphs``), as ``metareg train`` runs it on a GPU.
Before timing, the engine's meta-gradient is compared with the reference's in float64.

``--mc S`` adds Meta-Dropout's meta-test with S noise samples per inner step (S = 30 in its
presets) on the same shape: one episode's adaptation and query scores, with the S samples run one
after the other (``mc-sequential``) or stacked in one pass (``mc-batched``, per-copy batch norm);
episodes per second. ``auto`` (``inner.mc_batch``) follows these numbers: batched wherever the model
can stack copies (measured faster on the CPU too).

``--scheme joint`` times one step of MetaPerturb's joint meta-training (Algorithm 1's two passes,
without the optimizer steps) on T task networks (default: ResNet20, 10 tasks, 32 images of 32x32
per task and pass): ``joint-reference``, a plain per-task loop as the released code writes it (a
full ``backward()`` in both passes, the unneeded gradients thrown away); ``joint-loop``, the
engine's loop (``backward(inputs=...)``: only theta's gradients in the train pass and phi's in the
test pass); ``joint-vmap``, the engine's ``vmap`` over the stacked task networks.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any, cast

import torch

from ..build import build_network
from ..data.tasks import TaskBatch
from ..errors import ConfigError
from ..inner import build_inner_rule
from ..meta import BilevelLearner
from ..meta.bilevel import Strategy
from ..meta.graphs import CapturedStep
from ..meta.joint import JointLearner, JointStrategy, norm_in_eval_mode
from ..meta.reference import conv_forward, reference_meta_gradient
from ..nets import ConvNet
from ..perturb import build_perturbation
from ..runtime import keep_freed_memory

IMPLEMENTATIONS = ("reference", "reference+alloc", "engine", "engine-vmap", "engine-graph")
SHAPES = {  # the presets' task shapes
    "omniglot-20w1s": {"way": 20, "shot": 1, "query": 15, "channels": 64, "in_channels": 1, "image_size": 28},
    "miniimagenet-5w1s": {"way": 5, "shot": 1, "query": 15, "channels": 32, "in_channels": 3, "image_size": 84},
}
JOINT_IMPLEMENTATIONS = ("joint-reference", "joint-loop", "joint-vmap")


def _joint_problem(args: argparse.Namespace, dtype: torch.dtype, device: str, strategy: JointStrategy):
    torch.manual_seed(0)
    factory = build_perturbation("metaperturb", {"phi": "learned"})

    def build(t: int):
        torch.manual_seed(t)
        return build_network(args.arch, 10, args.image_size, {}, factory)

    # sample=False: the same numbers for every implementation (the gradient check)
    learner = JointLearner(
        build,
        list(range(args.tasks)),
        args.tasks,
        input_shape=(3, args.image_size, args.image_size),
        strategy=strategy,
        sample=False,
    ).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    shape = (args.tasks, args.batch_size, 3, args.image_size, args.image_size)
    batches = [
        (
            torch.randn(shape, generator=g, dtype=dtype).to(device),
            torch.randint(0, 10, shape[:2], generator=g).to(device),
        )
        for _ in range(2)
    ]
    return learner, batches


def _joint_reference_step(learner, batches):
    """Algorithm 1's passes written plainly: full backward passes, then discard the gradients that
    the stop-gradients of Eq. 3 exclude."""
    (x_tr, y_tr), (x_te, y_te) = batches

    def step():
        learner.zero_grad(set_to_none=True)
        for i, net in enumerate(learner.networks):
            torch.nn.functional.cross_entropy(net(x_tr[i]), y_tr[i]).backward()
        for p in learner.phi_parameters():  # phi learns from the test losses only
            p.grad = None
        theta = [p.grad.clone() for p in learner.theta_parameters()]
        with norm_in_eval_mode(learner.networks):
            for i, net in enumerate(learner.networks):
                (torch.nn.functional.cross_entropy(net(x_te[i]), y_te[i]) / learner.num_tasks).backward()
        for p, g in zip(learner.theta_parameters(), theta):  # theta learns from the train losses only
            p.grad = g

    return step


def _joint_engine_step(learner, batches):
    (x_tr, y_tr), (x_te, y_te) = batches

    def step():
        learner.zero_grad(set_to_none=True)
        learner.theta_backward(x_tr, y_tr, seed=0, step=0)
        learner.phi_backward(x_te, y_te, seed=0, step=0)

    return step


def check_joint_gradients(args: argparse.Namespace) -> float:
    """Largest relative difference of theta's and phi's gradients, engine (loop and vmap) vs the
    plain loop, in float64."""
    worst = 0.0
    reference, batches = _joint_problem(args, torch.float64, args.device, "loop")
    _joint_reference_step(reference, batches)()
    expected = [p.grad for p in reference.parameters()]
    for strategy in ("loop", "vmap"):
        learner, batches = _joint_problem(args, torch.float64, args.device, strategy)
        _joint_engine_step(learner, batches)()
        for e, p in zip(expected, learner.parameters()):
            worst = max(worst, ((p.grad - e).norm() / e.norm().clamp_min(1e-12)).item())
    return worst


def _problem(
    args: argparse.Namespace,
    dtype: torch.dtype,
    device: str,
    strategy: Strategy = "loop",
    perturbation: str = "none",
    mc_batch: bool = False,
    tasks: int | None = None,
):
    torch.manual_seed(0)
    c, size = args.in_channels, args.image_size
    model = ConvNet(args.way, c, size, channels=args.channels, perturbation=build_perturbation(perturbation)).to(
        device=device, dtype=dtype
    )
    g = torch.Generator().manual_seed(0)
    b, n = tasks or args.meta_batch, args.way

    def labels(k: int) -> torch.Tensor:
        return torch.stack([torch.randperm(n, generator=g).repeat_interleave(k) for _ in range(b)])

    batch = TaskBatch(
        torch.rand(b, n * args.shot, c, size, size, generator=g),
        labels(args.shot),
        torch.rand(b, n * args.query, c, size, size, generator=g),
        labels(args.query),
    ).to(device, dtype)
    fast = [name for name, _ in model.named_parameters() if "perturb" not in name]
    rule = build_inner_rule(
        {name: p for name, p in model.named_parameters() if name in fast}, step="sgd", lr=0.1, steps=args.steps
    )
    learner = BilevelLearner(model, rule, inner_steps=args.steps, strategy=strategy, fast=fast, mc_batch=mc_batch)
    return learner.to(device=device, dtype=dtype), batch


def _reference_step(learner: BilevelLearner, batch: TaskBatch, steps: int):
    params = {n: p.detach().clone().requires_grad_() for n, p in learner.model.named_parameters()}
    forward = partial(conv_forward, depth=len(cast(ConvNet, learner.model).blocks))  # the bench's network
    return lambda: reference_meta_gradient(params, batch, lr=0.1, steps=steps, forward=forward)


def _engine_step(learner: BilevelLearner, batch: TaskBatch):
    def step(*_: torch.Tensor):
        learner.zero_grad(set_to_none=True)
        return learner.meta_backward(batch)

    return step


def _graph_step(learner: BilevelLearner, batch: TaskBatch, device: str):
    """The engine's step captured as a CUDA graph (the batch in static buffers)."""
    inputs = [batch.support_x, batch.query_x]

    def step(support_x: torch.Tensor, query_x: torch.Tensor):
        learner.zero_grad(set_to_none=True)
        return learner.meta_backward(TaskBatch(support_x, batch.support_y, query_x, batch.query_y))

    graph = CapturedStep(step, inputs, modules=[learner], optimizers=[], device=torch.device(device))
    return lambda: graph(*inputs)


def _mc_step(learner: BilevelLearner, batch: TaskBatch, samples: int):
    """One episode's meta-test: adaptation with ``samples`` noise samples per step, query scores."""
    return lambda: learner.evaluate(batch, samples=samples)


def _peak_rss_mb() -> float:
    """The process's peak resident memory. ``VmHWM`` starts afresh at exec (``ru_maxrss`` of a
    child process would start at its parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one implementation in this process; returns seconds per iteration and peak memory."""
    if impl != "reference":
        keep_freed_memory()
    strategy: JointStrategy = "vmap" if impl.endswith("vmap") else "loop"
    if impl.startswith("joint"):
        learner, batches = _joint_problem(args, torch.float32, args.device, strategy)
        step = (
            _joint_reference_step(learner, batches)
            if impl == "joint-reference"
            else _joint_engine_step(learner, batches)
        )
    elif impl.startswith("mc-"):
        learner, batch = _problem(
            args, torch.float32, args.device, perturbation="meta-dropout", mc_batch=impl == "mc-batched", tasks=1
        )
        step = _mc_step(learner, batch, args.mc)
    else:
        learner, batch = _problem(args, torch.float32, args.device, strategy)
        if impl.startswith("reference"):
            step = _reference_step(learner, batch, args.steps)
        elif impl == "engine-graph":
            step = _graph_step(learner, batch, args.device)
        else:
            step = _engine_step(learner, batch)
    rss_before = _peak_rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    _sync(args.device)
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    peak = _peak_rss_mb()
    out = {
        "impl": impl,
        "strategy": strategy,
        "seconds": statistics.median(times),
        "times": times,
        "peak_rss_mb": peak,
        "rss_growth_mb": peak - rss_before,
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def check_gradients(args: argparse.Namespace) -> float:
    """Largest relative difference between engine and reference meta-gradients, in float64."""
    learner, batch = _problem(args, torch.float64, args.device)
    _, ref = _reference_step(learner, batch, args.steps)()
    _engine_step(learner, batch)()
    scale = torch.cat([g.flatten() for g in ref.values()]).norm()
    worst = 0.0
    for name, p in learner.model.named_parameters():
        err = (p.grad - ref[name]).norm().item()
        # A conv bias before batch norm has an exact gradient of zero: judge it on the global scale.
        denom = max(ref[name].norm().item(), 1e-6 * scale.item())
        worst = max(worst, err / denom)
    return worst


def profile_engine(args: argparse.Namespace) -> str:
    from torch.profiler import profile

    keep_freed_memory()
    learner, batch = _problem(args, torch.float32, args.device)
    step = _engine_step(learner, batch)
    step()
    with profile() as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def _run_workers(args: argparse.Namespace, impls: tuple[str, ...]) -> list[dict[str, Any]]:
    """Time each implementation in a fresh process (its own peak memory and process settings); the
    bench's settings travel as JSON."""
    settings = json.dumps({k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))})
    results = []
    for impl in impls:
        done = subprocess.run(  # noqa: S603 (our own module)
            [sys.executable, "-m", "metareg.runs.bench", "--worker", impl, settings],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{impl}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def _print_results(results: list[dict[str, Any]], per_step: int, unit: str) -> None:
    base = results[0]["seconds"] if results else None
    cuda = any("peak_cuda_mb" in r for r in results)
    memory = "peak GPU MB" if cuda else "peak RSS MB"
    print(f"{'implementation':<18}{'s/iter':>9}{unit:>13}{'it/s':>9}{memory:>13}{'speed-up':>10}")
    for r in results:
        ratio = f"{base / r['seconds']:.2f}x" if base else "-"
        peak = r.get("peak_cuda_mb", r["peak_rss_mb"])
        print(
            f"{r['impl']:<18}{r['seconds']:>9.4f}{per_step / r['seconds']:>13.1f}{1 / r['seconds']:>9.1f}"
            f"{peak:>13.0f}{ratio:>10}"
        )


def run_joint_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    args.image_size = args.image_size or 32
    print(
        f"bench: MetaPerturb joint step, {args.arch}, {args.tasks} tasks, {args.batch_size} images of "
        f"{args.image_size}x{args.image_size} "
        f"per task and pass, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    if not args.skip_check:
        worst = check_joint_gradients(args)
        print(
            f"float64 gradients of theta and phi, engine (loop, vmap) vs plain loop: max relative difference "
            f"{worst:.2e} "
            f"({'same gradients' if worst < 1e-9 else 'MISMATCH'})"
        )
    results = _run_workers(args, JOINT_IMPLEMENTATIONS)
    _print_results(results, 2 * args.tasks * args.batch_size, "images/s")
    return results


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    if getattr(args, "memory", False):
        from .bench_memory import run_memory_bench

        return run_memory_bench(args)
    if args.shape is not None and args.shape not in SHAPES:
        raise ConfigError(f"shape {args.shape!r} is measured by `metareg bench --memory`")
    if args.scheme == "joint":
        return run_joint_bench(args)
    cuda = args.device.startswith("cuda")
    shapes = [args.shape] if args.shape or not cuda else list(SHAPES)
    results = []
    for shape in shapes:
        run = argparse.Namespace(
            **(
                vars(args)
                | SHAPES[shape or "omniglot-20w1s"]
                | {k: v for k, v in vars(args).items() if k in SHAPES["omniglot-20w1s"] and v is not None}
            )
        )
        device = torch.cuda.get_device_name(run.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
        print(
            f"bench {shape or 'omniglot-20w1s'}: {run.way}-way {run.shot}-shot, {run.query} queries, "
            f"{run.image_size}x{run.image_size}x"
            f"{run.in_channels}, Conv4-{run.channels}, {run.steps} inner steps, second order, meta-batch "
            f"{run.meta_batch}, {device}"
        )
        if not run.skip_check:
            worst = check_gradients(run)
            verdict = "same meta-gradient" if worst < 1e-6 else "MISMATCH"
            print(f"float64 meta-gradient, engine vs reference: max relative difference {worst:.2e} ({verdict})")
        impls = tuple(
            i for i in IMPLEMENTATIONS if (i != "engine-graph" or cuda) and (i != "reference+alloc" or not cuda)
        )
        found = _run_workers(run, impls)
        _print_results(found, run.meta_batch, "tasks/s")
        results += found
        if run.mc:
            found = _run_workers(run, ("mc-sequential", "mc-batched"))
            print(f"Meta-Dropout meta-test, S = {run.mc} noise samples per inner step, one episode per call:")
            _print_results(found, 1, "episodes/s")
            results += found
        if run.profile:
            print(profile_engine(run))
    return results


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) != 3 or argv[0] != "--worker":
        raise SystemExit("usage: python -m metareg.runs.bench --worker IMPL SETTINGS_JSON; users run `metareg bench`")
    print(json.dumps(worker(argv[1], argparse.Namespace(**json.loads(argv[2])))))


if __name__ == "__main__":
    main()
