"""Issue 24: ResNet-12, recomputed second-order inner steps, the chunked meta-batch, mixed precision."""

from __future__ import annotations

import pytest
import torch

from helpers import learner_for, random_image_batch, tiny_conv
from metareg.errors import ConfigError, DistributedError
from metareg.meta.memory import saved_tensor_bytes
from metareg.meta.parallel import accumulate
from metareg.meta.precision import check_precision
from metareg.meta.reference import resnet12_forward
from metareg.nets import BatchNorm, ResNet12, create_model
from metareg.nets.slots import FeaturePerturbation
from metareg.perturb import build_perturbation
from metareg.selection import select

SMALL = {"widths": (3, 4, 5, 6)}


def tiny_resnet12(dtype=torch.float64, seed=0, **options) -> ResNet12:
    torch.manual_seed(seed)
    return create_model("resnet12", 3, in_channels=1, image_size=16, **(SMALL | options)).to(dtype)


def meta_grads(learner, batch, seed=5) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    metrics = learner.meta_backward(batch)
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}, metrics


def assert_same_grads(a: dict, b: dict, rtol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    scale = torch.cat([t.flatten() for t in b.values()]).norm()
    for name in a:
        err = (a[name] - b[name]).norm()
        assert err <= rtol * (b[name].norm() + scale), f"{name}: {err:.2e}"


# ------------------------------------------------------------------------------------ ResNet-12
def test_resnet12_has_metaoptnets_shapes_and_parameter_count():
    """84x84 RGB: maps 84 -> 42 -> 21 -> 10 -> 5, 640 x 5 x 5 = 16000 features (MetaOptNet's
    miniImageNet embedding), 12,424,320 backbone parameters (the 12.4M usually quoted) plus a
    16000 x 5 + 5 head. Catches a missing shortcut (count), a wrong width or pooling (shapes)."""
    net = create_model("resnet12", 5, in_channels=3, image_size=84)
    assert sum(p.numel() for n, p in net.named_parameters() if not n.startswith("head")) == 12_424_320
    assert net.feature_dim == 16000 and net.head.weight.shape == (5, 16000)
    sizes = []
    for block in net.blocks:
        block.register_forward_hook(lambda _m, _i, o: sizes.append(tuple(o.shape[1:])))
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert sizes == [(64, 42, 42), (160, 21, 21), (320, 10, 10), (640, 5, 5)]
    assert create_model("resnet12", 5, in_channels=3, image_size=84, avg_pool=True).feature_dim == 640
    with pytest.raises(ConfigError, match="4 positive widths"):
        create_model("resnet12", 5, widths=(64, 160, 320))


def test_resnet12_forward_equals_an_independent_functional_forward():
    """The block (three conv-BN, LeakyReLU(0.1) after the first two, 1x1 conv-BN shortcut, LeakyReLU
    and max-pool after the sum) against plain functional calls, float64, batch statistics. Catches a
    changed slope, a ReLU in place of the LeakyReLU, a missing norm, the shortcut's BN dropped."""
    net = tiny_resnet12()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(net(x), resnet12_forward(dict(net.named_parameters()), x), rtol=1e-12, atol=1e-12)


class Recorder(FeaturePerturbation):
    def __init__(self, info, seen):
        super().__init__()
        self.info, self.seen = info, seen

    def forward(self, pre, layer_input=None, *, sample=False):
        self.seen.append((self.info.index, tuple(pre.shape), tuple(layer_input.shape), sample))
        return pre


def test_resnet12_slots_groups_and_forms():
    """A slot per block (the residual sum, the block input) and one on the classifier, with the
    LayerInfo sizes of the maps; the layer groups select the first and last blocks and the head;
    episodic batch norm (no running statistics) by default, running statistics with standard=True."""
    seen, infos = [], []

    def factory(info):
        infos.append(info)
        return Recorder(info, seen)

    net = create_model("resnet12", 3, in_channels=1, image_size=16, perturbation=factory, **SMALL)
    net(torch.randn(2, 1, 16, 16), sample=True)
    assert [s[:3] for s in seen] == [
        (0, (2, 3, 16, 16), (2, 1, 16, 16)),
        (1, (2, 4, 8, 8), (2, 3, 8, 8)),
        (2, (2, 5, 4, 4), (2, 4, 4, 4)),
        (3, (2, 6, 2, 2), (2, 5, 2, 2)),
        (4, (2, 3), (2, 6)),
    ]
    assert [i.size for i in infos[:4]] == [16, 8, 4, 2] and infos[4].output and not infos[0].running_stats
    assert net.perturbation_points == [f"blocks.{i}.perturb" for i in range(4)]
    names = [n for n, _ in net.named_parameters()]
    groups = net.layer_groups()
    assert select(names, "head", groups) == ["head.weight", "head.bias"]
    assert all(n.startswith("blocks.0.") for n in select(names, "first-block", groups))
    assert len(select(names, "last-block", groups)) == 12  # 4 conv weights, 4 norms' weight and bias
    assert select(names, "full", groups) == names
    assert sum(isinstance(m, BatchNorm) for m in net.modules()) == 16
    assert not list(net.buffers())
    standard = create_model("resnet12", 3, in_channels=1, image_size=16, standard=True, **SMALL)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in standard.modules()) == 16
    assert [b.drop_rate for b in standard.blocks] == [0.1] * 4


def test_resnet12_dropblock_is_off_in_the_episodic_form_and_follows_metaoptnet_when_on():
    """Episodic default: sampled and deterministic passes agree (no DropBlock in MAML's inner loop).
    drop_rate=0.1: dropout in blocks 1-2, DropBlock in blocks 3-4, in sampled passes of a module in
    training mode only; DropBlock's rate ramps to 0.1 over the first third of training. Catches
    DropBlock left on by default, acting at eval time or on the query pass, or a missing ramp."""
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    net = tiny_resnet12().train()
    torch.testing.assert_close(net(x, sample=True), net(x))
    net = tiny_resnet12(drop_rate=0.1).train()
    assert [b.drop for b in net.blocks] == ["dropout", "dropout", "dropblock", "dropblock"]
    assert not torch.equal(net(x, sample=True), net(x))
    torch.testing.assert_close(net(x), net(x))  # the query pass (sample=False) is deterministic
    torch.testing.assert_close(net.eval()(x, sample=True), net(x))
    block = net.blocks[3]
    assert block.scheduled and not net.blocks[0].scheduled
    for progress, rate in ((0.0, 0.0), (1 / 6, 0.05), (1 / 3, 0.1), (0.9, 0.1)):
        block.set_training_progress(progress)
        assert block.rate == pytest.approx(rate)


# ------------------------------------------------------------------------ recomputed inner steps
@pytest.mark.parametrize(
    ("backbone", "perturbation", "step", "transforms"),
    [
        ("conv", "meta-dropout", "meta-sgd", None),
        ("conv", "none", "sgd", [{"name": "subspace-mask", "per": "row"}]),
        ("conv", "none", "sgd", [{"name": "dropgrad", "p": 0.3}]),
        ("resnet12", "none", "sgd", None),
    ],
)
def test_recomputed_inner_steps_give_the_stored_meta_gradient(backbone, perturbation, step, transforms):
    """float64: the meta-gradient of every meta-parameter (initial weights, Meta-Dropout's phi,
    Meta-SGD's step sizes, an MT-net mask's logits through the rule's state), the loss and the
    random stream afterwards equal the stored-graph path's; the perturbation noise (Meta-Dropout,
    DropGrad) is replayed identically in the meta-backward. Catches a recomputation without the
    saved RNG state, a meta-parameter left out of the step's inputs, the state's gradient dropped."""
    results = []
    for recompute in (False, True):
        factory = build_perturbation(perturbation)
        model = (
            tiny_conv(perturbation=factory)
            if backbone == "conv"
            else tiny_resnet12(perturbation=factory, drop_rate=0.2)
        )
        fast = [n for n, _ in model.named_parameters() if "perturb" not in n]
        learner = learner_for(model, steps=3, step=step, fast=fast, transforms=transforms, recompute=recompute)
        grads, metrics = meta_grads(learner, random_image_batch(tasks=2, size=16 if backbone == "resnet12" else 8))
        results.append((grads, metrics, torch.rand(3)))
    (stored, m1, r1), (recomputed, m2, r2) = results
    assert len(stored) >= 8
    assert_same_grads(recomputed, stored)
    torch.testing.assert_close(m2["loss"], m1["loss"], rtol=1e-13, atol=0)
    assert torch.equal(r1, r2)


def test_recomputed_steps_keep_far_less_of_the_graph_as_steps_grow():
    """The bytes the graph of one task's inner loop keeps alive: stored, each step adds its support
    activations and its gradient's graph; recomputed, only a copy of the fast weights. Catches a
    recompute path that still stores the steps' graphs."""

    def kept(recompute: bool, steps: int) -> int:
        learner = learner_for(tiny_conv(channels=8, size=16), steps=steps, recompute=recompute)
        batch = random_image_batch(tasks=1, size=16, shot=5)
        return saved_tensor_bytes(
            lambda: learner.adapt(learner.initial_params(), batch.support_x[0], batch.support_y[0])
        )[1]

    stored = kept(False, 6) - kept(False, 2)
    recomputed = kept(True, 6) - kept(True, 2)
    weights = sum(p.numel() * 8 for p in tiny_conv(channels=8, size=16).parameters())
    assert recomputed <= 4 * weights * 1.01  # four more steps: four more copies of the weights
    assert stored > 20 * recomputed


def test_recompute_needs_the_loop_strategy():
    with pytest.raises(ConfigError, match="loop or parallel strategy"):
        learner_for(tiny_conv(), strategy="vmap", recompute=True)


# ---------------------------------------------------------------------- chunked vmap meta-batch
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_vmap_in_chunks_accumulates_the_same_meta_gradient(chunk):
    """Five tasks vmapped in chunks of 1, 2, 3 (the last one shorter): the same meta-gradient
    (float64) as all at once and as the loop. Catches chunks divided by their own size instead of
    the meta-batch's, or a chunk skipped."""
    batch = random_image_batch(tasks=5)
    whole, m1 = meta_grads(learner_for(tiny_conv(), strategy="vmap"), batch)
    chunked, m2 = meta_grads(learner_for(tiny_conv(), strategy="vmap", task_chunk=chunk), batch)
    looped, _ = meta_grads(learner_for(tiny_conv(), strategy="loop"), batch)
    assert_same_grads(chunked, whole)
    assert_same_grads(chunked, looped, rtol=1e-10)
    torch.testing.assert_close(m2["loss"], m1["loss"], rtol=1e-13, atol=0)


def test_memory_budget_sizes_the_chunks_from_a_measured_task():
    """The chunk is the number of measured tasks that fit the budget (at least one; an error that
    names the remedy otherwise); the meta-gradient does not change. Catches a budget read in bytes
    instead of MiB, or a chunk of zero."""
    batch = random_image_batch(tasks=4)
    probe = learner_for(tiny_conv(), strategy="vmap", memory_budget=1.0)
    whole, _ = meta_grads(learner_for(tiny_conv(), strategy="vmap"), batch)
    chunked, _ = meta_grads(probe, batch)
    (task,) = probe.task_bytes.values()
    assert 0 < task < 2**20
    assert_same_grads(chunked, whole)
    budget = 2.5 * task / 2**20
    learner = learner_for(tiny_conv(), strategy="vmap", memory_budget=budget)
    calls = []
    original = learner._vmap_losses
    learner._vmap_losses = lambda b: calls.append(b.num_tasks) or original(b)
    assert_same_grads(meta_grads(learner, batch)[0], whole)
    assert calls == [2, 2]
    with pytest.raises(ConfigError, match=r"more than train\.memory_budget"):
        learner_for(tiny_conv(), strategy="vmap", memory_budget=0.5 * task / 2**20).meta_backward(batch)
    with pytest.raises(ConfigError, match="vmap"):
        learner_for(tiny_conv(), strategy="loop", memory_budget=100.0)


# ----------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_runs_products_in_bf16_with_float32_master_weights_and_gradients():
    """precision=bf16 on the CPU: convolutions and the classifier run in bfloat16 in the inner and
    the query passes; the loss is float32; the adapted fast weights, the meta-parameters and the
    meta-gradient accumulated over the tasks stay float32, within bf16's error of the float32
    meta-gradient. Catches autocast left off (dtypes), weights cast to bf16 (master weights), an
    accumulation in bf16 (grad dtype), or autocast around the backward only."""
    seen = []

    def learner(precision):
        torch.manual_seed(0)
        model = tiny_conv(dtype=torch.float32, channels=16, size=16)
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.register_forward_hook(lambda _m, _i, o: seen.append((precision, o.dtype)))
        return learner_for(model, steps=2, lr=0.1, precision=precision)

    batch = random_image_batch(tasks=3, size=16, shot=5, query=5, dtype=torch.float32)
    reference, _ = meta_grads(learner("float32"), batch)
    mixed = learner("bf16")
    _, loss, out = mixed.task_loss(batch, 0)
    assert loss.dtype == torch.float32 and out.dtype == torch.bfloat16
    adapted = mixed.adapt(mixed.initial_params(), batch.support_x[0], batch.support_y[0])
    assert all(adapted[n].dtype == torch.float32 for n in mixed.fast_names)
    seen.clear()
    grads, metrics = meta_grads(mixed, batch)
    assert {dtype for p, dtype in seen if p == "bf16"} == {torch.bfloat16}
    assert len(seen) == 3 * (2 * 3 + 3)  # 3 tasks x (2 support passes + 1 query pass) x 3 layers
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values()) and metrics["loss"].dtype == torch.float32
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref = torch.cat([reference[n].flatten() for n in grads])
    assert 0 < (flat - ref).norm() / ref.norm() < 0.15
    assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.99


def test_bf16_needs_float32_weights():
    with pytest.raises(ConfigError, match="float32 master weights"):
        check_precision("bf16", torch.float64)
    with pytest.raises(ConfigError, match="float32 or bf16"):
        learner_for(tiny_conv(), precision="fp16")


# ---------------------------------------------------------------------- parallel CPU strategy
def parallel_learner(workers=2, perturbation="none", **kw):
    model = tiny_conv(perturbation=build_perturbation(perturbation))
    fast = [n for n, _ in model.named_parameters() if "perturb" not in n]
    return learner_for(model, steps=2, strategy="parallel", workers=workers, fast=fast, **kw)


def test_parallel_strategy_gives_the_loops_meta_gradient():
    """float64, a deterministic model, 5 tasks over 2 and 3 processes (uneven shares), stored and
    recomputed steps: the rows summed in task order equal the loop's accumulated meta-gradient and
    loss; a second meta-batch after an in-place update of the weights sees the new weights in the
    helpers (shared memory). Catches rows summed out of order or into the wrong parameters, a share
    skipped, helpers holding stale copies of the weights."""
    batch = random_image_batch(tasks=5)
    for workers, recompute in ((2, False), (3, True)):
        loop = learner_for(tiny_conv(), steps=2)
        expected, metrics = meta_grads(loop, batch)
        learner = parallel_learner(workers, recompute=recompute)
        grads, got = meta_grads(learner, batch)
        assert_same_grads(grads, expected, rtol=1e-13)
        torch.testing.assert_close(got["loss"], metrics["loss"], rtol=1e-14, atol=0)
        assert len(learner.pool.processes) == workers - 1
        for p, q in zip(learner.parameters(), loop.parameters()):
            p.data.add_(0.1)
            q.data.add_(0.1)
        assert_same_grads(meta_grads(learner, batch)[0], meta_grads(loop, batch)[0], rtol=1e-13)
        learner.pool.close()


def test_parallel_noise_comes_from_per_task_seeds_and_helpers_follow_mode_and_progress():
    """Meta-Dropout: each task's noise comes from its own seed drawn from torch's generator, so the
    meta-gradient does not depend on the number of processes, repeats for a seed, and the global
    stream moves by the seeds only. DropGrad at training progress 0 (rate 0) equals the loop, so
    the helpers got the progress. Catches helpers drawing from their forked copy of the stream, or
    running at their own (default) progress."""
    batch = random_image_batch(tasks=4)
    two, three = parallel_learner(2, "meta-dropout"), parallel_learner(3, "meta-dropout")
    a, _ = meta_grads(two, batch, seed=7)
    after = torch.rand(2)
    b, _ = meta_grads(three, batch, seed=7)
    assert_same_grads(a, b, rtol=1e-13)
    assert_same_grads(meta_grads(two, batch, seed=7)[0], a, rtol=0)
    assert not torch.equal(meta_grads(two, batch, seed=8)[0]["model.head.weight"], a["model.head.weight"])
    torch.manual_seed(7)
    seeds = torch.randint(0, 2**62, (4,)).tolist()
    assert torch.equal(torch.rand(2), after)
    one = parallel_learner(2, "meta-dropout")
    rows, used, _ = one.task_gradients(batch, 4, seeds=seeds)  # one process, the same per-task seeds
    one.zero_grad(set_to_none=True)
    accumulate([p for p in one.parameters() if p.requires_grad], [rows], used)
    assert_same_grads({n: p.grad for n, p in one.named_parameters() if p.grad is not None}, a, rtol=1e-13)
    dropgrad = [{"name": "dropgrad", "p": 0.5, "schedule": "linear"}]
    parallel, loop = parallel_learner(2, transforms=dropgrad), learner_for(tiny_conv(), steps=2, transforms=dropgrad)
    parallel.meta_backward(batch)  # the helpers are forked at training progress 1
    for learner in (parallel, loop):
        learner.set_training_progress(0.0)
    assert_same_grads(meta_grads(parallel, batch)[0], meta_grads(loop, batch)[0], rtol=1e-13)
    for learner in (two, three, parallel):
        learner.pool.close()


def test_parallel_strategy_reports_a_dead_helper_and_refuses_running_statistics():
    """A helper killed between meta-batches: one DistributedError that says what to do, not a hang.
    Running batch-norm statistics (which the processes would update at once): a ConfigError."""
    learner = parallel_learner(2)
    batch = random_image_batch(tasks=2)
    learner.meta_backward(batch)
    (helper,) = learner.pool.processes
    helper.kill()
    helper.join()
    with pytest.raises(DistributedError, match="--resume"):
        learner.meta_backward(batch)
    learner.pool.close()
    with pytest.raises(ConfigError, match="running statistics"):
        learner_for(tiny_conv(running_stats=True), strategy="parallel", workers=2)


def test_a_parallel_meta_dropout_run_resumes_exactly(tmp_path):
    """`metareg train` with train.strategy=parallel and Meta-Dropout's noise: a run stopped after 3
    iterations and resumed ends with the weights and Adam moments, bit for bit, of one that ran
    straight through (the per-task seeds come from the checkpointed generator, the helpers are
    forked afresh after the resume and see the loaded weights). Catches seeds drawn from an
    unsaved generator, or helpers forked before the checkpoint's weights were loaded."""
    from helpers import assert_same_tensors, final_params, tiny
    from metareg.runs.episodic import train

    extra = (
        "model.perturbation=meta-dropout",
        "model.options={channels: 4}",
        "inner.fast=[blocks.*, head.*]",
        "train.strategy=parallel",
        "train.workers=2",
    )
    train(tiny("train.iterations=6", "train.checkpoint_every=3", *extra), tmp_path / "straight", progress=False)
    train(tiny("train.iterations=3", "train.checkpoint_every=3", *extra), tmp_path / "split", progress=False)
    train(
        tiny("train.iterations=6", "train.checkpoint_every=3", *extra), tmp_path / "split", resume=True, progress=False
    )
    assert_same_tensors(final_params(tmp_path / "straight"), final_params(tmp_path / "split"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.precision=fp16"], "float32 or bf16"),
        (["train.precision=bf16", "dtype=float64"], "float32 master weights"),
        (["train.strategy=threads"], "auto, loop, vmap or parallel"),
        (["train.workers=0"], "train.workers must be >= 1"),
        (["train.memory_budget=-1"], "train.memory_budget must be > 0"),
        (["train.task_chunk=2", "train.memory_budget=9"], "not both"),
    ],
)
def test_bad_memory_and_precision_settings_are_config_errors(overrides, message):
    from metareg.config import parse_assignment
    from metareg.runs.common import resolve

    with pytest.raises(ConfigError, match=message):
        resolve("quickstart", None, [parse_assignment(o) for o in overrides])


def test_maml_plus_plus_schedules_give_the_same_meta_gradient_in_every_strategy():
    """MAML++'s multi-step loss and derivative-order annealing (both follow the epoch) under
    recomputed steps, vmap and the parallel processes: the loop's meta-gradient at each epoch
    (epoch 0: multi-step and first order; 1: multi-step, second order; 2: the last query loss).
    Catches helpers that keep the epoch they were forked at (checked: the parallel rows then
    differ from epoch 1 on) and a recomputed step that drops the intermediate query losses."""
    from metareg import BilevelLearner, InnerRule

    batch = random_image_batch(tasks=3)

    def meta_gradient(epoch: int, **engine) -> torch.Tensor:
        torch.manual_seed(0)
        learner = BilevelLearner(
            tiny_conv(), InnerRule("sgd", lr=0.1), inner_steps=3, multi_step_epochs=2, first_order_epochs=1, **engine
        )
        learner.set_epoch(0)
        learner.meta_backward(batch)  # the helpers (parallel) are forked here, at epoch 0
        learner.zero_grad()
        learner.set_epoch(epoch)
        learner.meta_backward(batch)
        grads = torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])
        if learner.pool is not None:
            learner.pool.close()
        return grads

    by_epoch = [meta_gradient(epoch, strategy="loop") for epoch in range(3)]
    assert not torch.allclose(by_epoch[0], by_epoch[1]) and not torch.allclose(by_epoch[1], by_epoch[2])
    for epoch, reference in enumerate(by_epoch):
        for engine in (
            {"strategy": "loop", "recompute": True},
            {"strategy": "vmap"},
            {"strategy": "parallel", "workers": 2},
            {"strategy": "parallel", "workers": 2, "recompute": True},
        ):
            torch.testing.assert_close(
                meta_gradient(epoch, **engine), reference, rtol=1e-10, atol=1e-12, msg=str(engine)
            )
