"""The CUDA tier (``pytest -m cuda``): the GPU paths checked against the eager and CPU ones. Every
test here skips, with its reason, where CUDA is absent (CI has no GPU); ``benchmarks/gpu_run.sh``
runs them first in every GPU window. Their CPU-side logic is tested in the normal suite
(test_engine_gpu_paths.py: the capturable step equals a plain meta-iteration, the warm-up state is
restored, the gathered episodes are the seed's; and the capture fallback below runs on the CPU).

Until this tier has passed on a GPU, ``train.cuda_graph`` defaults to off.

``METAREG_CUDA_TIER_ON_CPU=1`` runs the tier's code on the CPU (no capture: the graph assertions
are skipped): ``benchmarks/gpu_run.sh --cpu-smoke`` does, so that a GPU window is never spent on a
bug in these tests."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from helpers import final_params, learner_for, random_image_batch, tiny, tiny_conv
from metareg import cli
from metareg.meta.graphs import CapturedStep, capture_or_none
from metareg.perturb import build_perturbation
from metareg.runs.episodic import train

CUDA = torch.cuda.is_available()
ON_CPU = not CUDA and os.environ.get("METAREG_CUDA_TIER_ON_CPU") == "1"  # the tier's code, checked on the CPU
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(
    not (CUDA or ON_CPU), reason="no CUDA GPU: the CUDA tier runs in GPU windows (benchmarks/gpu_run.sh)"
)
pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def deterministic_kernels():
    """cuDNN's deterministic algorithms, so that two runs of the same kernels agree bit for bit
    and the comparisons below measure the graph, not the atomics of a convolution's backward."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def cuda_trainer(tmp_path, name: str, graph: bool, *extra: str):
    config = tiny(f"device={DEVICE}", f"train.cuda_graph={'true' if graph else 'false'}", "train.steps=0", *extra)
    return train(config, tmp_path / name, progress=False)


STOCHASTIC = ("perturb.name=meta-dropout", "inner.transforms=[{name: dropgrad, kind: gaussian, p: 0.2}]")


@needs_cuda
@pytest.mark.parametrize("extra", [(), STOCHASTIC], ids=["maml", "metadropout-dropgrad"])
def test_the_captured_step_replays_the_eager_step_for_20_iterations(tmp_path, extra):
    """20 meta-iterations replayed from one captured CUDA graph give the eager run's losses,
    weights and Adam moments (float32 round-off). With Meta-Dropout and DropGrad the noise drawn
    inside the graph must be fresh at every replay and the eager run's: a graph replaying one
    draw, or drawing other numbers, departs from the eager losses within a few steps."""
    runs = {}
    for graph in (True, False):
        trainer = cuda_trainer(tmp_path, f"graph-{graph}", graph, *extra)
        torch.cuda.manual_seed_all(7)
        losses = [trainer.train_step(i)["loss"] for i in range(20)]
        assert (trainer.graph is not None) == (graph and CUDA), "the step was (not) captured"
        runs[graph] = (torch.stack(losses).cpu(), trainer)
    (graph_losses, captured), (eager_losses, eager) = runs[True], runs[False]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
    if extra:  # the noise changes from step to step: losses on the same episodes would repeat otherwise
        assert len(set(graph_losses.tolist())) == 20
    for (name, a), b in zip(captured.learner.state_dict().items(), eager.learner.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for p, q in zip(captured.learner.parameters(), eager.learner.parameters()):
        for slot in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                captured.optimizer.state[p][slot], eager.optimizer.state[q][slot], rtol=1e-4, atol=1e-9
            )


@needs_cuda
def test_a_run_resumed_with_graphs_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """Stop after 3 of 6 iterations with graphs on, resume (a new capture): the same final
    weights as 6 uninterrupted iterations (the capture's warm-up changes nothing, the generators
    continue where the checkpoint left them)."""
    config = (f"device={DEVICE}", "train.cuda_graph=true", "train.checkpoint_every=3", *STOCHASTIC)
    train(tiny(*config, "train.steps=6"), tmp_path / "straight", progress=False)
    train(tiny(*config, "train.steps=3"), tmp_path / "cut", progress=False)
    resumed = train(tiny(*config, "train.steps=6"), tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 6 and (resumed.graph is not None) == CUDA

    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


@needs_cuda
def test_vmap_and_loop_meta_gradients_agree_on_cuda():
    """The two execution strategies give the same second-order meta-gradient on the GPU (float64)."""
    batch = random_image_batch(tasks=3).to(DEVICE)
    grads = {}
    for strategy in ("loop", "vmap"):
        learner = learner_for(tiny_conv(), strategy=strategy).to(DEVICE)
        learner.meta_backward(batch)
        grads[strategy] = [p.grad for p in learner.parameters()]
    for a, b in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@needs_cuda
def test_episodes_gathered_on_the_gpu_are_the_cpus():
    from metareg.data import EpisodeSampler
    from test_engine_gpu_paths import rotated_classes

    sampler = EpisodeSampler(rotated_classes(), way=4, shot=1, query=2)
    on_cpu = sampler.sample(5, torch.Generator().manual_seed(11))
    on_gpu = sampler.to(DEVICE).sample(5, torch.Generator().manual_seed(11))
    assert on_gpu.support_x.device.type == DEVICE
    for a, b in zip(
        (on_cpu.support_x, on_cpu.support_y, on_cpu.query_x, on_cpu.query_y),
        (on_gpu.support_x, on_gpu.support_y, on_gpu.query_x, on_gpu.query_y),
    ):
        assert torch.equal(a, b.cpu())


@needs_cuda
def test_batched_monte_carlo_samples_equal_sequential_passes_on_cuda(monkeypatch):
    """S = 3 stacked copies in one pass = the mean of 3 passes with the same noise, on the GPU (float64)."""
    from metareg.nets import create_model
    from test_engine_gpu_paths import NoiseTape

    torch.manual_seed(0)
    model = (
        create_model(
            "conv4",
            3,
            in_channels=1,
            image_size=8,
            channels=4,
            depth=2,
            perturbation=build_perturbation("meta-dropout"),
        )
        .double()
        .to(DEVICE)
    )
    batch = random_image_batch(tasks=1, way=3, shot=2, query=1, size=8).to(DEVICE)
    x, y = batch.support_x[0], batch.support_y[0]
    tape = NoiseTape(3)
    monkeypatch.setattr(torch, "randn_like", tape.randn_like)
    monkeypatch.setattr(torch, "randn", tape.randn)
    batched = learner_for(model, mc_batch=True).inner_loss(dict(model.named_parameters()), x, y, 3)
    tape.replay, parts = True, []
    sequential = learner_for(model, mc_batch=False)
    for s in range(3):
        tape.copy, tape.index = s, 0
        parts.append(sequential.inner_loss(dict(model.named_parameters()), x, y, 1))
    torch.testing.assert_close(batched, torch.stack(parts).mean(), rtol=1e-12, atol=1e-12)


def test_a_capture_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    """Runs on the CPU too (the capture itself is faked there): a failing capture returns None and
    says why in one warning; the trainer then runs the step eagerly."""

    def broken(*_args, **_kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    if not CUDA:
        monkeypatch.setattr(CapturedStep, "__init__", broken)
    x = torch.ones(3, device="cuda" if CUDA else "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = capture_or_none(
            lambda t: {"y": t * t.sum().item()},  # .item() syncs: not capturable on a real GPU
            (x,),
            modules=[],
            optimizers=[],
            device=torch.device("cuda"),
        )
    assert step is None
    assert len(caught) == 1 and "running the training step eagerly" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)


@needs_cuda
def test_metareg_test_on_cuda_scores_each_episode_as_on_the_cpu(tmp_path, capsys):
    """A deterministic model (no perturbation) meta-tested on the GPU and on the CPU: the same
    per-episode scores up to float32 round-off (an episode may flip at most one tied query)."""
    run = tmp_path / "run"
    train(tiny("train.steps=3", "device=cpu"), run, progress=False)
    scores = {}
    for device in ("cpu", DEVICE):
        out = tmp_path / f"{device}-{len(scores)}.json"
        args = ["--no-progress", "test", "--checkpoint", str(run), "--device", device, "--episodes", "20"]
        assert cli.main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
        scores[device] = json.loads(out.read_text())
    cpu, gpu = scores["cpu"], scores[DEVICE]
    a, b = torch.tensor(cpu["scores"]), torch.tensor(gpu["scores"])
    assert (a - b).abs().max() <= 1 / 6 + 1e-9 and (a != b).sum() <= 1
    assert abs(cpu["nll"] - gpu["nll"]) < 1e-4
