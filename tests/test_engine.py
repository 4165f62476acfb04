"""The bilevel engine against an independent reference loop and finite differences."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    learner_for,
    random_image_batch,
    random_regression_batch,
    tiny_conv,
    tiny_mlp,
)
from metareg.errors import ConfigError
from metareg.meta.reference import conv_forward, mlp_forward, reference_meta_gradient


def engine_grads(learner, batch):
    learner.zero_grad(set_to_none=True)
    metrics = learner.meta_backward(batch)
    return metrics, {n: p.grad.clone() for n, p in learner.model.named_parameters()}


def assert_close_rel(a: dict, b: dict, rtol: float):
    """Relative error per tensor; tensors whose exact gradient is zero (a conv bias before batch
    norm) are held to an absolute tolerance at the scale of the whole gradient."""
    scale = torch.cat([t.flatten() for t in b.values()]).norm()
    for name in a:
        err = (a[name] - b[name]).norm()
        assert err <= rtol * b[name].norm() + 1e-12 * scale, f"{name}: error {err:.2e}, norm {b[name].norm():.2e}"


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_reference_loop_conv(strategy, first_order):
    model = tiny_conv(depth=2)
    learner = learner_for(model, lr=0.3, steps=3, first_order=first_order, strategy=strategy)
    batch = random_image_batch(tasks=3)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref_loss, ref = reference_meta_gradient(
        params, batch, lr=0.3, steps=3, forward=partial(conv_forward, depth=2), first_order=first_order
    )
    metrics, got = engine_grads(learner, batch)
    assert torch.allclose(metrics["loss"], ref_loss, rtol=1e-10)
    assert_close_rel(got, ref, 1e-6)


def test_meta_gradient_equals_reference_loop_mlp_regression():
    model = tiny_mlp()
    learner = learner_for(model, lr=0.01, steps=2, task="regression")
    batch = random_regression_batch()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    _, ref = reference_meta_gradient(params, batch, lr=0.01, steps=2, forward=mlp_forward, loss_fn=F.mse_loss)
    _, got = engine_grads(learner, batch)
    assert_close_rel(got, ref, 1e-6)


def test_second_order_matches_finite_differences():
    """d/dtheta of L_query(theta - lr * grad L_support(theta)), by central differences."""
    model = tiny_mlp(hidden=(4,))
    learner = learner_for(model, lr=0.5, steps=2, task="regression")
    batch = random_regression_batch(tasks=2, shot=4, query=3)
    _, got = engine_grads(learner, batch)
    eps = 1e-6
    for name, p in learner.model.named_parameters():
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            old = flat[j].item()
            flat[j] = old + eps
            up = learner.meta_loss(batch).item()
            flat[j] = old - eps
            down = learner.meta_loss(batch).item()
            flat[j] = old
            fd = (up - down) / (2 * eps)
            assert abs(got[name].view(-1)[j].item() - fd) < 1e-6 * max(1.0, abs(fd)), (name, j)


def test_first_order_drops_the_second_order_term():
    model = tiny_mlp(hidden=(4,))
    batch = random_regression_batch(tasks=2, shot=4, query=3)
    _, second = engine_grads(learner_for(model, lr=0.5, steps=2, task="regression"), batch)
    _, first = engine_grads(learner_for(model, lr=0.5, steps=2, task="regression", first_order=True), batch)
    # First order: the meta-gradient is the query gradient at the adapted weights.
    learner = learner_for(model, lr=0.5, steps=2, task="regression")
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(batch.num_tasks):
        start = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        adapted = learner.adapt(start, batch.support_x[i], batch.support_y[i], create_graph=False)
        adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
        out = torch.func.functional_call(model, adapted, (batch.query_x[i],))
        for n, g in zip(
            adapted, torch.autograd.grad(F.mse_loss(out, batch.query_y[i]) / batch.num_tasks, list(adapted.values()))
        ):
            expected[n] += g
    assert_close_rel(first, expected, 1e-10)
    assert any((first[n] - second[n]).norm() > 1e-6 * second[n].norm() for n in first)


def test_meta_sgd_step_sizes_get_gradients_and_match_sgd_at_init():
    model = tiny_conv(depth=2)
    batch = random_image_batch(tasks=2)
    meta_sgd = learner_for(model, lr=0.2, steps=2, step="meta-sgd")
    _metrics, grads = engine_grads(meta_sgd, batch)
    lr_grads = [p.grad for n, p in meta_sgd.named_parameters() if n.startswith("inner.")]
    assert lr_grads and all(g is not None and g.abs().sum() > 0 for g in lr_grads)
    _, sgd_grads = engine_grads(learner_for(model, lr=0.2, steps=2), batch)
    assert_close_rel(grads, sgd_grads, 1e-10)


def test_only_fast_parameters_are_adapted():
    model = tiny_conv(depth=2)
    learner = learner_for(model, fast=["blocks.*.conv.*", "head.*"])
    batch = random_image_batch(tasks=1)
    start = learner.initial_params()
    adapted = learner.adapt(start, batch.support_x[0], batch.support_y[0])
    for n in start:
        changed = not torch.equal(adapted[n], start[n])
        assert changed == (n in learner.fast_names), n
    assert "blocks.0.norm.bias" not in learner.fast_names


def test_bad_fast_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match="matches no parameter"):
        learner_for(tiny_conv(), fast=["nonexistent.*"])


def test_evaluate_does_not_touch_meta_parameters_and_matches_manual_adaptation():
    model = tiny_conv(depth=2)
    learner = learner_for(model, lr=0.3, steps=2)
    batch = random_image_batch(tasks=2)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    scores = learner.evaluate(batch)
    assert scores.shape == (2,)
    assert all(torch.equal(before[n], p) for n, p in learner.named_parameters())
    assert all(p.grad is None for p in learner.parameters())
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for i in range(2):
        fast = list(params.values())
        for _ in range(2):
            loss = F.cross_entropy(
                conv_forward(dict(zip(params, fast)), batch.support_x[i], depth=2), batch.support_y[i]
            )
            fast = [w - 0.3 * g for w, g in zip(fast, torch.autograd.grad(loss, fast))]
        acc = (
            (conv_forward(dict(zip(params, fast)), batch.query_x[i], depth=2).argmax(-1) == batch.query_y[i])
            .double()
            .mean()
        )
        assert scores[i].item() == pytest.approx(acc.item(), abs=1e-7)


def test_evaluate_scores_the_query_outputs_of_the_steps_samples_and_attack_it_is_given(monkeypatch):
    """``BilevelLearner.evaluate`` (what `metareg bench` times): per-task MSE of the adapted model's
    query outputs, with the step count, noise samples and attack passed through to the inner loop
    and the query pass. Kills the mutants that survived mutmut by dropping one of them."""
    batch = random_regression_batch(tasks=2)
    learner = learner_for(tiny_mlp(), task="regression", steps=2)
    seen = []
    query_outputs = learner.query_outputs

    def recorded(b, **kw):
        seen.append(kw)
        return query_outputs(b, **kw)

    monkeypatch.setattr(learner, "query_outputs", recorded)
    attacked = []

    def attack(_learner, _params, x, _y):  # leaves the query images as they are, says it was called
        attacked.append(x)
        return x

    learner.evaluate(batch, steps=3, samples=2, attack=attack)
    assert seen == [{"steps": 3, "samples": 2, "attack": attack}] and len(attacked) == batch.num_tasks
    monkeypatch.undo()
    for steps in (1, 4):
        scores = learner.evaluate(batch, steps=steps)
        outputs = learner.query_outputs(batch, steps=steps)
        expected = torch.stack([F.mse_loss(o, y) for o, y in zip(outputs, batch.query_y)])
        torch.testing.assert_close(scores, expected, rtol=1e-12, atol=0)
    assert not torch.equal(learner.evaluate(batch, steps=1), learner.evaluate(batch, steps=4))


def test_the_meta_test_inner_loop_uses_its_own_steps_samples_seeds_and_no_meta_graph(monkeypatch):
    """``adapt_for_test`` / ``query_outputs`` (the meta-test path, Algorithm 2): the meta-test step
    count and noise samples S by default, the given ones otherwise; no second-order graph (the
    adapted weights move one-for-one with the start); each task's noise seeded by its seed, so a
    task's outputs do not depend on the tasks before it; the attack called with the learner, the
    task's adapted weights and its query images and labels. Kills the meta-test-path mutants that
    survived mutmut in the unit tier (meta/bilevel.py)."""
    from metareg.perturb import build_perturbation

    model = tiny_conv(perturbation=build_perturbation("meta-dropout"))
    learner = learner_for(model, steps=2, eval_inner_steps=3, eval_mc_samples=2)
    batch = random_image_batch(tasks=2)
    calls = []
    inner_loss = learner.inner_loss

    def counted(params, x, y, samples):
        calls.append(samples)
        return inner_loss(params, x, y, samples)

    monkeypatch.setattr(learner, "inner_loss", counted)
    start = learner.detached_params()
    x, y = batch.support_x[0], batch.support_y[0]
    adapted = learner.adapt_for_test(start, x, y)
    assert calls == [2, 2, 2]  # 3 meta-test steps of S = 2
    calls.clear()
    learner.adapt_for_test(start, x, y, steps=1, samples=4)
    assert calls == [4]
    calls.clear()
    fast = learner.fast_names[0]
    (moved,) = torch.autograd.grad(adapted[fast].sum(), start[fast])
    assert torch.equal(moved, torch.ones_like(moved))  # first order: no path through the inner gradients
    # query_outputs: steps and samples passed on, one seed per task
    learner.query_outputs(batch, steps=1, samples=3)
    assert calls == [3, 3]
    seen = []

    def attack(who, params, qx, qy):
        seen.append((who, params, qx, qy))
        return qx

    outputs = learner.query_outputs(batch, seeds=[11, 12], attack=attack)
    torch.manual_seed(12)
    second = learner.query_outputs(
        type(batch)(*(t[1:] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    )
    assert torch.equal(outputs[1], second[0])  # task 1 alone, seeded the same: the same outputs
    assert not torch.equal(learner.query_outputs(batch, seeds=[11, 13])[1], outputs[1])
    for i, (who, params, qx, qy) in enumerate(seen):
        assert who is learner and torch.equal(qx, batch.query_x[i]) and torch.equal(qy, batch.query_y[i])
        assert not torch.equal(params[fast], start[fast])  # the task's adapted weights


def test_task_gradients_give_zeros_for_parameters_that_get_no_gradient():
    """A meta-parameter the meta-loss does not reach gets a zero block in every row and is reported
    unused (so the gather's sum leaves its ``.grad`` empty), in both strategies."""
    for strategy in ("loop", "vmap"):
        model = tiny_conv()
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)))
        learner = learner_for(model, strategy=strategy, fast=["blocks.*", "head.*"])
        rows, used, _ = learner.task_gradients(random_image_batch(tasks=2), total=2)
        params = [p for p in learner.parameters() if p.requires_grad]
        index = next(i for i, p in enumerate(params) if p is model.unused)
        offset = sum(p.numel() for p in params[:index])
        assert not used[index] and sum(used) == len(params) - 1
        assert rows[:, offset : offset + 3].abs().max() == 0 and rows.abs().max() > 0


def test_refusals_of_the_engine_name_what_and_why():
    """The first-order refusal lists up to three of the perturbation's parameters (and says when
    there are more), the batched-samples refusal names the first batch norm with running
    statistics. Kills the message mutants that survived mutmut (meta/bilevel.py)."""
    from metareg.nets import create_model
    from metareg.perturb import build_perturbation

    why = ": they learn through the inner-loop steps; use second order (inner.first_order=false) or a perturbation "
    cases = {  # perturbation -> its parameters in a 2-block ConvNet, as listed
        "weight-gaussian": "blocks.0.perturb.rho, blocks.1.perturb.rho, head_perturb.rho)",
        "meta-dropout-deterministic": "blocks.0.perturb.phi.weight, blocks.0.perturb.phi.bias, "
        "blocks.1.perturb.phi.weight, ...)",
    }
    for name, listed in cases.items():
        with pytest.raises(ConfigError) as refusal:
            learner_for(tiny_conv(perturbation=build_perturbation(name)), first_order=True)
        assert str(refusal.value) == (
            f"first-order meta-gradients cannot train the perturbation's parameters ({listed}{why}without parameters"
        )
    model = create_model("resnet20", 3, in_channels=3, image_size=8, blocks=(1, 1, 1))
    with pytest.raises(ConfigError, match=r"norm; stem\.1 keeps running statistics: use inner\.mc_batch=sequential$"):
        learner_for(model, mc_batch=True)


def test_meta_backward_dispatches_on_the_strategy_and_reports_loss_and_accuracy(monkeypatch):
    """``meta_backward`` returns the mean query loss and accuracy (what the trainer logs) in both
    strategies; the vmap strategy runs the vmap path, whose query pass is the deterministic one
    (``sample=False``) after the sampled inner steps. Kills the dispatch, metric-name and
    query-sampling mutants that survived mutmut (meta/bilevel.py)."""
    from metareg.perturb import build_perturbation

    batch = random_image_batch(tasks=2)
    for strategy in ("loop", "vmap"):
        learner = learner_for(tiny_conv(), strategy=strategy)
        metrics = learner.meta_backward(batch)
        assert set(metrics) == {"loss", "score"} and 0 <= metrics["score"] <= 1 and metrics["loss"] > 0
    learner = learner_for(tiny_conv(perturbation=build_perturbation("meta-dropout")), strategy="vmap", steps=2)
    monkeypatch.setattr(learner, "_meta_backward_vmap", lambda _batch: "the vmap path")
    assert learner.meta_backward(batch) == "the vmap path"
    monkeypatch.undo()
    flags = []
    forward = learner.model.forward

    def recorded(x, *, sample=False, **kw):
        flags.append(sample)
        return forward(x, sample=sample, **kw)

    monkeypatch.setattr(learner.model, "forward", recorded)
    learner._vmap_losses(batch)
    assert flags == [True, True, False]  # two sampled inner steps, then the deterministic query pass
