"""MAML++ (Antoniou et al. 2019) against hand calculations: the multi-step loss weights and objective,
derivative-order annealing, per-step batch norm (weights, biases and running statistics at the right
inner step), the cosine schedule of the meta learning rate, and the presets of the paper's rows."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import learner_for, random_image_batch, random_regression_batch, tiny_conv, tiny_mlp
from metareg.config import parse_assignment
from metareg.errors import ConfigError
from metareg.meta.schedule import cosine_learning_rate, epoch_of, epochs_in, multi_step_weights
from metareg.nets.layers import BatchNorm, current_step, inner_step
from metareg.runs.common import resolve
from metareg.runs.episodic import train


# ------------------------------------------------------------------------------- the schedules
def test_multi_step_weights_by_hand():
    """N = 5 steps annealed over 15 epochs, floor 0.03 / 5 = 0.006 (the released configs' values).
    Catches a changed decay (1 / N / epochs), floor or cap, or the last step not gaining what the others lose."""
    assert multi_step_weights(5, 0, 15) == pytest.approx([0.2] * 5)
    # epoch 3: the first four lose 3/75 each, the last gains 4 * 3/75
    assert multi_step_weights(5, 3, 15) == pytest.approx([0.16] * 4 + [0.36])
    assert multi_step_weights(5, 14, 15) == pytest.approx([0.2 - 14 / 75] * 4 + [0.2 + 56 / 75])
    # past the annealing the floor and the cap hold: 0.006 each, 1 - 4 * 0.006 = 0.976 for the last
    assert multi_step_weights(5, 20, 15) == pytest.approx([0.006] * 4 + [0.976])
    assert multi_step_weights(3, 1, 2) == pytest.approx([1 / 6, 1 / 6, 2 / 3])


def test_epochs_and_cosine_schedule_by_hand():
    """Iteration i is in epoch i // 500; the rate is min + (base - min)(1 + cos(pi e / E)) / 2.
    Catches an off-by-one epoch, a missing floor, a sine for a cosine."""
    assert [epoch_of(i, 500) for i in (0, 499, 500, 1999)] == [0, 0, 1, 3]
    assert epochs_in(50000, 500) == 100 and epochs_in(3, 2) == 2
    assert cosine_learning_rate(1e-3, 1e-5, 0, 100) == pytest.approx(1e-3)
    assert cosine_learning_rate(1e-3, 1e-5, 50, 100) == pytest.approx(1e-5 + 0.99e-3 * 0.5)
    assert cosine_learning_rate(1e-3, 1e-5, 25, 100) == pytest.approx(1e-5 + 0.99e-3 * (1 + math.sqrt(0.5)) / 2)
    assert cosine_learning_rate(1e-3, 1e-5, 100, 100) == pytest.approx(1e-5)


# --------------------------------------------------------------------------- the meta-objective
def _reference(model, params, batch, lr, steps, second_order):
    """Hand-written MAML on one task: SGD inner steps (the graph kept or not), the query loss after each."""
    fast = dict(params)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, fast, (batch.support_x[0],)), batch.support_y[0])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        losses.append(F.mse_loss(functional_call(model, fast, (batch.query_x[0],)), batch.query_y[0]))
    return losses


def test_multi_step_loss_is_the_weighted_sum_of_the_query_losses_after_each_step():
    """Epoch 1 of 2 MSL epochs with 3 steps: the objective is (1/6) L1 + (1/6) L2 + (2/3) L3, and its
    meta-gradient too; from epoch 2 the objective is L3 alone. Catches weights applied to the wrong
    step, the query loss taken before the step, or MSL left on after its epochs."""
    model = tiny_mlp()
    learner = learner_for(model, lr=0.05, steps=3, task="regression", multi_step_epochs=2)
    batch = random_regression_batch(tasks=1)
    params = dict(model.named_parameters())
    losses = _reference(model, params, batch, 0.05, 3, second_order=True)
    learner.set_epoch(1)
    expected = (losses[0] + losses[1]) / 6 + 2 * losses[2] / 3
    got = learner.meta_loss(batch)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(got, list(params.values())), torch.autograd.grad(expected, list(params.values()))
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    learner.set_epoch(2)
    torch.testing.assert_close(learner.meta_loss(batch), losses[2], rtol=1e-12, atol=1e-12)
    assert learner.scheduled


def test_derivative_order_annealing_switches_from_first_to_second_order():
    """first_order_epochs=2: at epochs 0 and 1 the meta-gradient is the first-order one (inner
    gradients constant), at epoch 2 the second-order one; the two differ here, so a switch at the
    wrong epoch or a learner that ignores it fails."""
    model = tiny_mlp()
    learner = learner_for(model, lr=0.05, steps=2, task="regression", first_order_epochs=2)
    batch = random_regression_batch(tasks=1)
    params = dict(model.named_parameters())
    grads = {}
    for order in (False, True):
        loss = _reference(model, params, batch, 0.05, 2, second_order=order)[-1]
        grads[order] = torch.autograd.grad(loss, list(params.values()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False], grads[True]))
    for epoch, second in ((0, False), (1, False), (2, True), (7, True)):
        learner.set_epoch(epoch)
        assert learner.second_order is second
        got = torch.autograd.grad(learner.meta_loss(batch), list(params.values()))
        for a, b in zip(got, grads[second]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_gives_the_loop_s_multi_step_objective():
    """The batched strategy computes the same weighted objective and first-order switch as the loop."""
    batch = random_regression_batch(tasks=3)
    results = {}
    for strategy in ("loop", "vmap"):
        model = tiny_mlp()
        learner = learner_for(
            model, lr=0.05, steps=3, task="regression", multi_step_epochs=3, first_order_epochs=1, strategy=strategy
        )
        learner.set_epoch(0)
        learner.meta_backward(batch)
        results[strategy] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["loop"], results["vmap"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- per-step batch norm
def test_per_step_weights_and_biases_are_used_at_their_step():
    """BNWB: inside inner_step(k) the layer uses row k of its weight and bias, the last row outside any
    step and beyond its rows. Catches a shared row, an off-by-one row, no clamping."""
    norm = BatchNorm(2, steps=3, per_step_weights=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        norm.bias.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]))
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    standard = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    for step, row in ((0, 0), (1, 1), (2, 2), (5, 2), (None, 2)):
        with inner_step(step):
            out = norm(x)
        expected = standard * norm.weight[row].view(1, -1, 1, 1) + norm.bias[row].view(1, -1, 1, 1)
        torch.testing.assert_close(out, expected)


def test_per_step_running_statistics_are_collected_and_used_at_their_step():
    """BNRS: a training pass in step 1 moves row 1 (only) by momentum 0.1 toward the batch's mean and
    unbiased variance; the output still uses the batch statistics (the released code's); in eval mode
    with stats_at_test the layer normalizes with row k's statistics."""
    norm = BatchNorm(2, steps=3, per_step_stats=True, stats_at_test=True).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64) * 3 + 1
    with inner_step(1):
        out = norm(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(norm.running_mean[1], 0.1 * mean)
    torch.testing.assert_close(norm.running_var[1], 0.9 + 0.1 * var)
    assert torch.equal(norm.running_mean[[0, 2]], torch.zeros(2, 2))
    assert torch.equal(norm.running_var[[0, 2]], torch.ones(2, 2))
    batch_standard = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(out, batch_standard)
    norm.eval()
    with inner_step(1):
        out = norm(x)
    torch.testing.assert_close(
        out, (x - norm.running_mean[1].view(1, -1, 1, 1)) / torch.sqrt(norm.running_var[1].view(1, -1, 1, 1) + 1e-5)
    )
    # evaluation passes collect nothing
    before = norm.running_mean.clone()
    with inner_step(2):
        norm(x)
    assert torch.equal(norm.running_mean, before)


def test_the_learner_runs_every_pass_at_its_inner_step():
    """Support pass of step k and query pass after step k at row k: 0, 1, 2 then the query at 2; with
    the multi-step loss a query pass after every step; at meta-test the query after the last step."""
    seen = []
    model = tiny_conv(per_step_weights=True, per_step_stats=True, norm_steps=3)
    model.blocks[0].norm.register_forward_pre_hook(lambda _module, _args: seen.append(current_step()))
    learner = learner_for(model, steps=3, multi_step_epochs=1, fast=["blocks.*.conv.*", "head.*"])
    batch = random_image_batch(tasks=1)
    learner.set_epoch(1)
    learner.meta_backward(batch)
    assert seen == [0, 1, 2, 2]
    seen.clear()
    learner.set_epoch(0)
    learner.meta_backward(batch)
    assert seen == [0, 0, 1, 1, 2, 2]
    seen.clear()
    learner.eval()
    learner.query_outputs(batch, steps=4)
    assert seen == [0, 1, 2, 3, 3]
    assert model.blocks[0].norm.running_mean.abs().sum() > 0  # meta-training collected statistics


def test_running_statistics_refuse_vmap_and_choose_the_loop():
    model = tiny_conv(per_step_stats=True, norm_steps=2)
    with pytest.raises(ConfigError, match="loop strategy"):
        learner_for(model, steps=2, strategy="vmap")
    config = resolve("quickstart", None, [parse_assignment("model.options={channels: 4, per_step_stats: true}")])
    from metareg.build import build_learner, resolve_strategy

    assert build_learner(config).strategy == "loop"
    assert resolve_strategy("auto", torch.device("cuda"), "conv4", vmap_safe=False) == "loop"


# ------------------------------------------------------------------------------------ the trainer
def test_the_trainer_tells_the_epoch_and_anneals_the_meta_learning_rate(tmp_path):
    """3 iterations of 1-iteration epochs: the learner ends in epoch 2 and Adam's rate is epoch 2's
    cosine value of 3 epochs: 1e-5 + (1e-3 - 1e-5)(1 + cos(2 pi / 3)) / 2."""
    overrides = [
        "data.options={num_classes: 20}",
        "data.way=3",
        "data.query=2",
        "model.options={channels: 4, per_step_weights: true, per_step_stats: true}",
        "inner.step=per-step",
        "inner.steps=2",
        "inner.multi_step_epochs=2",
        "inner.first_order_epochs=1",
        "train.steps=3",
        "train.epoch_steps=1",
        "train.lr_schedule=cosine",
        "train.min_lr=1e-5",
        "train.meta_batch=2",
        "train.val_every=100",
    ]
    config = resolve("quickstart", None, [parse_assignment(o) for o in overrides])
    trainer = train(config, tmp_path / "run", progress=False)
    assert trainer.learner.epoch == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 + 0.99e-3 * 0.25)
    norm = trainer.learner.model.blocks[0].norm
    assert norm.weight.shape == (2, 4) and norm.running_mean.shape == (2, 4)  # norm_steps filled from inner.steps


def test_mamlpp_presets_follow_the_released_configs():
    omniglot = resolve("omniglot-20w1s-mamlpp")
    assert (omniglot.train.steps, omniglot.train.epoch_steps, omniglot.train.meta_batch) == (50000, 500, 8)
    assert (omniglot.inner.step, omniglot.inner.lr, omniglot.inner.multi_step_epochs) == ("per-step", 0.1, 10)
    assert omniglot.inner.first_order_epochs == 0 and omniglot.train.clip is None
    assert omniglot.model.options["per_step_weights"] and omniglot.model.options["per_step_stats"]
    mini = resolve("miniimagenet-5w5s-mamlpp")
    assert (mini.model.options["channels"], mini.train.meta_batch, mini.inner.first_order_epochs) == (48, 2, 11)
    assert (mini.train.lr_schedule, mini.train.min_lr, mini.train.clip) == ("cosine", 1e-3, 10.0)
    for bad, needle in (
        ("train.lr_schedule=linear", "constant or cosine"),
        ("inner.multi_step_epochs=-1", "multi_step_epochs"),
        ("train.epoch_steps=0", "epoch_steps"),
    ):
        with pytest.raises(ConfigError, match=needle):
            resolve("omniglot-20w1s-mamlpp", None, [parse_assignment(bad)])
