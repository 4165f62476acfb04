"""``metareg bench --memory``: peak memory and time per meta-iteration of second-order MAML, the engine
against a plain loop and the inner loops of learn2learn and higher.

Problems (``--shape``, both by default), all weights adapted by SGD, second order, ``--steps``
inner steps (5 and 10 by default), random inputs from a fixed seed:

* ``omniglot-20w1s``: Conv4-64, 20-way 1-shot, 15 queries, 28x28 grayscale, meta-batch 4, alpha 0.1;
* ``miniimagenet-5w5s-resnet12``: ResNet-12 (episodic batch norm), 5-way 5-shot, 15 queries, 84x84
  RGB, alpha 0.01, meta-batch 1 on a CPU (every implementation here keeps one task's graph at a
  time, so memory does not depend on the meta-batch and time is linear in it) and 2 on CUDA (MAML's
  5-shot meta-batch).

Implementations, each in its own process (its peak memory is its own; the engine's with
:func:`metareg.runtime.keep_freed_memory`, the process setting ``metareg train`` applies, which
changes its speed, not its peak; the others with the default allocator, as their users run them):

* ``plain-loop``: :func:`metareg.meta.reference.reference_meta_gradient`, ``autograd.grad`` with
  ``create_graph=True`` on plain functional calls, a backward per task;
* ``learn2learn``: ``learn2learn.algorithms.MAML`` (``clone()``, ``adapt()`` per step, a backward
  per task) on the same module; its package ``__init__`` imports torchvision and gym, so the bench
  loads ``learn2learn.algorithms.maml`` and ``learn2learn.utils`` alone;
* ``higher``: ``higher.innerloop_ctx`` with a differentiable SGD, a backward per task;
* ``engine``: ``BilevelLearner.meta_backward`` with the strategy ``metareg train`` takes on this
  device, the graph of every inner step stored;
* ``engine-recompute``: the same with ``train.recompute`` (:mod:`metareg.meta.recompute`);
* ``engine-parallel`` (CPU): the engine with ``train.strategy=parallel`` (the meta-batch's tasks
  shared among single-thread processes, :mod:`metareg.meta.parallel`), stored; ``auto`` takes the
  loop on a CPU, so this row is what decides whether it should take this;
* ``engine-bf16`` (CUDA only): the engine under bf16 autocast (``train.precision``), after the
  bf16 meta-gradient's relative error and cosine against float32's on one task of the shape.

learn2learn and higher are not dependencies: install them into a folder of their own
(``pip install --no-deps --target DIR learn2learn higher``) and pass ``--extra-path DIR``; absent,
their rows say "not installed". Before timing, each available implementation's float64
meta-gradient is compared with the plain loop's on a small problem of the same kind.

Peak memory: the process's peak resident set (``VmHWM``) on a CPU, summed over the helper processes
of the ``parallel`` strategy (a sum of peaks: an upper bound of the peak of the sum);
``torch.cuda.max_memory_allocated`` on CUDA. ``--memory-limit GB`` caps each process's data
segment (``RLIMIT_DATA``: its heap, where :func:`~metareg.runtime.keep_freed_memory` puts every
tensor; default 16): an implementation that needs more is reported as out of memory instead of
pushing the machine into the OOM killer.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..build import resolve_device, resolve_mc_batch, resolve_strategy
from ..data.tasks import TaskBatch
from ..inner import build_inner_rule
from ..meta import BilevelLearner
from ..meta.bilevel import Precision, Strategy
from ..meta.reference import conv_forward, reference_meta_gradient, resnet12_forward
from ..nets import create_model
from ..runtime import keep_freed_memory

SHAPES: dict[str, dict[str, Any]] = {
    "omniglot-20w1s": {
        "backbone": "conv4",
        "options": {"channels": 64},
        "way": 20,
        "shot": 1,
        "query": 15,
        "in_channels": 1,
        "image_size": 28,
        "lr": 0.1,
        "meta_batch": {"cpu": 4, "cuda": 4},
    },
    "miniimagenet-5w5s-resnet12": {
        "backbone": "resnet12",
        "options": {},
        "way": 5,
        "shot": 5,
        "query": 15,
        "in_channels": 3,
        "image_size": 84,
        "lr": 0.01,
        "meta_batch": {"cpu": 1, "cuda": 2},
    },
}
THIRD_PARTY = ("learn2learn", "higher")
OOM = "out of memory"


def load_learn2learn() -> Any:
    """learn2learn's MAML module, without the package ``__init__`` (which imports torchvision and gym)."""
    if "learn2learn.algorithms.maml" in sys.modules:
        return sys.modules["learn2learn.algorithms.maml"]
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = next(iter(spec.submodule_search_locations))
    for name in ("learn2learn", "learn2learn.algorithms"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = stub
    return importlib.import_module("learn2learn.algorithms.maml")


def load_higher() -> Any:
    return importlib.import_module("higher") if importlib.util.find_spec("higher") else None


def installed(name: str) -> bool:
    try:
        return (load_learn2learn() if name == "learn2learn" else load_higher()) is not None
    except Exception:  # an import that fails for any reason counts as absent
        return False


# ------------------------------------------------------------------------------------ problems
def problem(shape: dict, dtype: torch.dtype, device: str, tasks: int, small: bool = False):
    """The model (all weights fast, SGD) and a batch of random tasks; ``small``: the gradient
    check's tiny version (a few channels, small images, two steps)."""
    torch.manual_seed(0)
    size = 16 if small else shape["image_size"]
    options = dict(shape["options"])
    if small:
        options = {"channels": 4} if shape["backbone"] == "conv4" else {"widths": (3, 4, 5, 6)}
    way, shot, query = (3, 2, 2) if small else (shape["way"], shape["shot"], shape["query"])
    model = create_model(shape["backbone"], way, in_channels=shape["in_channels"], image_size=size, **options)
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)

    def labels(k: int) -> torch.Tensor:
        return torch.stack([torch.randperm(way, generator=g).repeat_interleave(k) for _ in range(tasks)])

    c = shape["in_channels"]
    batch = TaskBatch(
        torch.rand(tasks, way * shot, c, size, size, generator=g),
        labels(shot),
        torch.rand(tasks, way * query, c, size, size, generator=g),
        labels(query),
    ).to(device, dtype)
    return model, batch


def engine(
    model, shape: dict, steps: int, device: str, strategy: Strategy, recompute: bool, precision: Precision = "float32"
) -> BilevelLearner:
    rule = build_inner_rule(dict(model.named_parameters()), step="sgd", lr=shape["lr"], steps=steps)
    learner = BilevelLearner(
        model,
        rule,
        inner_steps=steps,
        strategy=strategy,
        recompute=recompute,
        precision=precision,
        mc_batch=resolve_mc_batch("auto", torch.device(device), model),
    )
    return learner.to(device=device, dtype=next(model.parameters()).dtype)


def default_strategy(shape: dict, device: str) -> Strategy:
    return resolve_strategy("auto", resolve_device(device), shape["backbone"])


def step_function(impl: str, model, batch: TaskBatch, shape: dict, steps: int, device: str):
    """One meta-iteration of ``impl`` (the meta-gradient accumulated into the weights' ``.grad``)."""
    n, lr = batch.num_tasks, shape["lr"]
    if impl == "plain-loop":
        params = dict(model.named_parameters())
        forward = resnet12_forward if shape["backbone"] == "resnet12" else partial(conv_forward, depth=4)

        def plain() -> None:
            _, grads = reference_meta_gradient(params, batch, lr=lr, steps=steps, forward=forward)
            for k, p in params.items():
                p.grad = grads[k]

        return plain
    if impl == "learn2learn":
        maml = load_learn2learn().MAML(model, lr=lr, first_order=False)

        def l2l() -> None:
            model.zero_grad(set_to_none=True)
            for i in range(n):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(batch.support_x[i]), batch.support_y[i]))
                (F.cross_entropy(learner(batch.query_x[i]), batch.query_y[i]) / n).backward()

        return l2l
    if impl == "higher":
        higher = load_higher()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def hi() -> None:
            model.zero_grad(set_to_none=True)
            for i in range(n):
                with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(F.cross_entropy(fmodel(batch.support_x[i]), batch.support_y[i]))
                    (F.cross_entropy(fmodel(batch.query_x[i]), batch.query_y[i]) / n).backward()

        return hi
    strategy: Strategy = "parallel" if impl == "engine-parallel" else default_strategy(shape, device)
    precision: Precision = "bf16" if impl == "engine-bf16" else "float32"
    learner = engine(model, shape, steps, device, strategy, recompute=impl == "engine-recompute", precision=precision)

    def ours() -> None:
        learner.zero_grad(set_to_none=True)
        learner.meta_backward(batch)

    ours.learner = learner  # type: ignore[attr-defined]
    return ours


def check_gradients(name: str, impls: list[str], device: str) -> dict[str, float]:
    """Each implementation's float64 meta-gradient against the plain loop's, on a small problem."""
    shape = SHAPES[name]
    out = {}
    model, batch = problem(shape, torch.float64, device, tasks=2, small=True)
    step_function("plain-loop", model, batch, shape, 2, device)()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    scale = torch.cat([g.flatten() for g in expected.values()]).norm()
    for impl in impls:
        if impl == "plain-loop":
            continue
        model, batch = problem(shape, torch.float64, device, tasks=2, small=True)
        step_function(impl, model, batch, shape, 2, device)()
        errors = [
            (p.grad - expected[k]).norm() / max(expected[k].norm(), 1e-6 * scale) for k, p in model.named_parameters()
        ]
        out[impl] = float(max(errors))
    return out


def precision_error(name: str, steps: int, device: str) -> tuple[float, float]:
    """The bf16 meta-gradient of one task of the real shape against the float32 one: relative
    error and cosine similarity (what decides whether ``train.precision=bf16`` may become a default)."""
    shape = SHAPES[name]
    grads = []
    for precision in ("float32", "bf16"):
        model, batch = problem(shape, torch.float32, device, tasks=1)
        learner = engine(model, shape, steps, device, "loop", recompute=False, precision=precision)
        learner.meta_backward(batch)
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None]))
    exact, mixed = grads
    error = ((mixed - exact).norm() / exact.norm()).item()
    return error, F.cosine_similarity(mixed, exact, dim=0).item()


# ----------------------------------------------------------------------------------- workers
def _peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (``VmHWM``, which starts afresh at exec)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else 0.0


def worker(impl: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Time one implementation on one shape in this process."""
    if impl.startswith("engine"):  # the process setting `metareg train` applies; the others run as their users run them
        keep_freed_memory()
    if settings["memory_limit"]:
        limit = int(settings["memory_limit"] * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    shape, device, steps = SHAPES[settings["shape"]], settings["device"], settings["steps"]
    model, batch = problem(shape, torch.float32, device, settings["meta_batch"])
    step = step_function(impl, model, batch, shape, steps, device)
    cuda = device.startswith("cuda")
    before = _peak_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    try:
        for i in range(1 + settings["iterations"]):  # the first is a warm-up
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as err:
        if not ran_out_of_memory(f"{type(err).__name__}: {err}"):
            raise
        return {"impl": impl, "error": OOM, "limit_gb": settings["memory_limit"], "seconds_before": times}
    learner = getattr(step, "learner", None)
    pool = getattr(learner, "pool", None)
    helpers = [p.pid for p in pool.processes] if pool is not None else []
    peak = _peak_rss_mb() + sum(_peak_rss_mb(pid) for pid in helpers)
    out = {
        "impl": impl,
        "strategy": getattr(learner, "strategy", "-"),
        "processes": 1 + len(helpers),
        "seconds": statistics.median(times),
        "times": times,
        "peak_mb": peak,
        "start_mb": before,
    }
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "memoryerror", "bad_alloc")


def ran_out_of_memory(error_output: str) -> bool:
    """Whether error output shows a failed allocation anywhere, not only on its last line:
    learn2learn catches the allocator's RuntimeError inside ``adapt``, prints it and then fails on an
    unbound variable (UnboundLocalError), which is still an out-of-memory."""
    text = error_output.lower()
    return any(failure in text for failure in ALLOCATION_FAILURES)


def _run_worker(impl: str, settings: dict[str, Any], extra_path: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), extra_path) if p])
    done = subprocess.run(  # noqa: S603 (our own module)
        [sys.executable, "-m", "metareg.runs.bench_memory", impl, json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        if ran_out_of_memory(done.stderr) or done.returncode in (-9, 137):
            return {"impl": impl, "error": OOM, "limit_gb": settings["memory_limit"]}
        return {"impl": impl, "error": f"failed: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(r: dict[str, Any], base: dict[str, Any] | None, unit: str) -> str:
    name = r["impl"] + (f" ({r['strategy']}, {r['processes']} proc)" if r.get("strategy", "-") not in ("-",) else "")
    if "error" in r:
        detail = f"{r['error']}" + (f" (> {r['limit_gb']:g} GB)" if r["error"] == OOM else "")
        return f"{name:<40}{detail}"
    ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base and "seconds" in base else "-"
    memory = f"{base['peak_mb'] / r['peak_mb']:.2f}x" if base and "peak_mb" in base else "-"
    return f"{name:<40}{r['seconds']:>9.2f}{r['peak_mb']:>{len(unit) + 3}.0f}{ratio:>12}{memory:>12}"


def run_memory_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device
    kind = "cuda" if device.startswith("cuda") else "cpu"
    names = [args.shape] if args.shape else list(SHAPES)
    steps_list = args.memory_steps or [5, 10]
    if args.extra_path:  # the folder of learn2learn and higher serves this bench run only
        sys.path.append(args.extra_path)
    present = {name: installed(name) for name in THIRD_PARTY}
    threads = torch.get_num_threads()
    unit = "peak GPU MB" if kind == "cuda" else "peak RSS MB"
    results = []
    for name in names:
        if name not in SHAPES:
            raise SystemExit(f"metareg bench: error: --memory shapes are {', '.join(SHAPES)}, got {name!r}")
        shape = SHAPES[name]
        strategy = default_strategy(shape, device)
        impls = ["plain-loop", *THIRD_PARTY, "engine", "engine-recompute"]
        if kind == "cpu" and strategy != "parallel":
            impls.append("engine-parallel")
        if kind == "cuda":  # bf16 autocast: measured where it is meant to pay
            impls.append("engine-bf16")
        meta_batch = shape["meta_batch"][kind]
        iterations = args.iterations if shape["backbone"] != "resnet12" or kind == "cuda" else 1
        checked = check_gradients(name, [i for i in impls if i not in THIRD_PARTY or present[i]], device)
        print(
            f"bench --memory {name}: {shape['backbone']}, {shape['way']}-way {shape['shot']}-shot, {shape['query']} "
            f"queries, {shape['image_size']}x{shape['image_size']}x{shape['in_channels']}, second order, SGD alpha "
            f"{shape['lr']}, meta-batch {meta_batch}, {device} ({threads} threads), {iterations} timed iteration(s) "
            f"after 1 warm-up"
        )
        print(
            "float64 meta-gradient vs the plain loop (small problem of this kind): "
            + ", ".join(f"{k} {v:.1e}" for k, v in checked.items())
        )
        for steps in steps_list:
            print(f"{steps} inner steps:")
            if kind == "cuda":
                error, cosine = precision_error(name, steps, device)
                print(
                    f"bf16 autocast meta-gradient vs float32, one task: relative error {error:.2e}, cosine {cosine:.5f}"
                )
            print(f"{'implementation':<40}{'s/iter':>9}{unit:>14}{'speed-up':>12}{'memory':>12}")
            rows = []
            for impl in impls:
                if impl in THIRD_PARTY and not present[impl]:
                    rows.append({"impl": impl, "error": "not installed (see --extra-path)"})
                    continue
                settings = {
                    "shape": name,
                    "device": device,
                    "steps": steps,
                    "meta_batch": meta_batch,
                    "iterations": iterations,
                    "memory_limit": args.memory_limit if kind == "cpu" else 0,
                }
                rows.append(_run_worker(impl, settings, args.extra_path) | {"shape": name, "steps": steps})
            base = next((r for r in rows if r["impl"] == "plain-loop" and "seconds" in r), None)
            for r in rows:
                print(_row(r, base, unit))
            print("(speed-up and memory: the plain loop's s/iter and peak over this row's)")
            results += rows
    print(markdown(results, unit))
    return results


def markdown(results: list[dict[str, Any]], unit: str) -> str:
    """All rows as one Markdown table (for the README)."""
    lines = [f"| shape | inner steps | implementation | s / meta-iteration | {unit} |", "|---|---|---|---|---|"]
    for r in results:
        name = r["impl"] + (f" ({r['strategy']})" if r.get("strategy", "-") != "-" else "")
        if "error" in r:
            cells = f"{r['error']}" + (f" (> {r['limit_gb']:g} GB)" if r["error"] == OOM else "")
            lines.append(f"| {r.get('shape', '')} | {r.get('steps', '')} | {name} | {cells} | |")
        else:
            lines.append(f"| {r['shape']} | {r['steps']} | {name} | {r['seconds']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) != 2:
        raise SystemExit("usage: python -m metareg.runs.bench_memory IMPL SETTINGS_JSON; users run `metareg bench`")
    print(json.dumps(worker(argv[0], json.loads(argv[1]))))


if __name__ == "__main__":
    main()
