"""DropGrad, T-nets and MT-nets: noise laws, exact reductions to MAML, masks, composition."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import learner_for, random_regression_batch
from metareg.inner import DropGrad, SubspaceMask, build_inner_rule
from metareg.meta import BilevelLearner
from metareg.nets import MLP

W_ONLY = ["layers.*", "head.*"]  # T-net: only W (and b) are adapted


def mlp(transform=False, seed=0):
    torch.manual_seed(seed)
    return MLP(1, 1, (6, 5), transform=transform).double()


@pytest.mark.parametrize("kind", ["binary", "gaussian"])
def test_dropgrad_noise_has_mean_one_and_variance_p_over_1_minus_p(kind):
    torch.manual_seed(0)
    p = 0.3
    drop = DropGrad({"w": torch.zeros(1)}, p=p, kind=kind)
    g = torch.ones(400_000, dtype=torch.float64)
    noise = drop.update({"w": g}, None, 0)[0]["w"]
    n = noise.numel()
    var = p / (1 - p)
    assert abs(noise.mean().item() - 1) < 5 * math.sqrt(var / n)
    # Variance of the sample variance: (mu4 - var^2) / n; bounded generously by 4 var^2 / n for these laws.
    assert abs(noise.var().item() - var) < 5 * math.sqrt(4 * var**2 / n) + 5 * math.sqrt(var**2 * 3 / n)
    if kind == "binary":
        assert set(torch.unique(noise).tolist()) == {0.0, 1 / (1 - p)}


def test_dropout_rates_outside_0_1_and_unknown_kinds_are_refused_by_name():
    """DropGrad and the feature dropouts share ``metareg.noise``: p in [0, 1) (p = 1 would divide by
    zero), kind binary or gaussian, each refusal naming what and the bad value. Found by mutation
    testing (mutmut: ``p <= 1.0``, ``p < 2.0`` and empty messages survived)."""
    from metareg.errors import ConfigError
    from metareg.noise import check_dropout

    for p in (1.0, 1.5, -0.1, math.nan):
        with pytest.raises(ConfigError, match=rf"DropGrad rate p must be in \[0, 1\), got {p}"):
            DropGrad({"w": torch.zeros(1)}, p=p)
    with pytest.raises(ConfigError, match="dropout kind must be binary or gaussian, got 'uniform'"):
        check_dropout("dropout", 0.1, "uniform")
    check_dropout("dropout", 0.0, "binary")  # the edges that are fine
    check_dropout("dropout", 0.999, "gaussian")


@pytest.mark.parametrize("kind", ["binary", "gaussian"])
def test_dropout_noise_has_the_dtype_of_what_it_multiplies(kind):
    """float64 gradients get float64 noise (not float32 noise promoted: its values would carry
    float32 rounding). Found by mutation testing (``dtype=None`` survived)."""
    from metareg.noise import dropout_noise

    like = torch.zeros(3, dtype=torch.float64)
    noise = dropout_noise((1000,), 0.3, kind, like)
    assert noise.dtype == torch.float64 and noise.device == like.device
    if kind == "gaussian":  # float32 values would be exactly representable in float32
        assert not torch.equal(noise, noise.float().double())


def test_dropgrad_is_off_at_evaluation_and_respects_layers_and_schedule():
    params = {"layers.0.weight": torch.zeros(3), "head.weight": torch.zeros(3)}
    drop = DropGrad(params, p=0.5, kind="binary", layers=["head.*"], schedule="linear")
    grads = {k: torch.ones(1000) for k in params}
    drop.set_training_progress(0.0)
    assert drop.rate == 0.0 and torch.equal(drop.update(grads, None, 0)[0]["head.weight"], grads["head.weight"])
    drop.set_training_progress(0.5)
    assert drop.rate == 0.25
    out = drop.update(grads, None, 0)[0]
    assert torch.equal(out["layers.0.weight"], grads["layers.0.weight"])  # not in `layers`
    assert not torch.equal(out["head.weight"], grads["head.weight"])
    drop.eval()
    assert torch.equal(drop.update(grads, None, 0)[0]["head.weight"], grads["head.weight"])
    drop.set_training_progress(1.7)  # past the end of training (a longer resumed run): the full rate, not more
    assert drop.rate == 0.5


def test_tnet_with_identity_t_gives_exactly_maml():
    batch = random_regression_batch(tasks=3, shot=5, query=4)
    maml = learner_for(mlp(), lr=0.05, steps=2, task="regression")
    tnet_model = mlp(transform=True)
    tnet = learner_for(tnet_model, lr=0.05, steps=2, task="regression", fast=W_ONLY)
    assert all(torch.equal(tnet_model.state_dict()[k], v) for k, v in maml.model.state_dict().items())
    a = maml.adapt(maml.initial_params(), batch.support_x[0], batch.support_y[0])
    b = tnet.adapt(tnet.initial_params(), batch.support_x[0], batch.support_y[0])
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-15), name
    for learner in (maml, tnet):
        learner.zero_grad()
        learner.meta_backward(batch)
    for name, p in maml.model.named_parameters():
        assert torch.allclose(p.grad, dict(tnet.model.named_parameters())[name].grad, rtol=1e-12, atol=1e-15), name
    t_grads = [p.grad for n, p in tnet.model.named_parameters() if "transform" in n]
    assert t_grads and all(g is not None and g.abs().sum() > 0 for g in t_grads)  # T is meta-learned


def test_mtnet_mask_at_infinite_logits_updates_exactly_the_chosen_rows():
    model = mlp(transform=True)
    learner = learner_for(
        model, lr=0.1, steps=1, task="regression", fast=W_ONLY, transforms=[{"name": "subspace-mask", "per": "row"}]
    )
    mask = learner.inner.transforms[0]
    chosen = {}
    with torch.no_grad():
        for key, zeta in mask.logits.items():
            rows = torch.arange(zeta.numel()) % 2 == 0
            zeta.copy_(torch.where(rows, math.inf, -math.inf))
            chosen[key.replace("__", ".")] = rows
    batch = random_regression_batch(tasks=1)
    start = learner.initial_params()
    adapted = learner.adapt(start, batch.support_x[0], batch.support_y[0])
    unmasked = learner_for(model, lr=0.1, steps=1, task="regression", fast=W_ONLY).adapt(
        start, batch.support_x[0], batch.support_y[0]
    )
    for weight, rows in chosen.items():
        for name in (weight, weight.removesuffix("weight") + "bias"):
            assert torch.equal(adapted[name][rows], unmasked[name][rows]), name  # chosen rows: plain step
            assert torch.equal(adapted[name][~rows], start[name][~rows]), name  # the others: untouched
            if (~rows).any():
                assert not torch.equal(unmasked[name][~rows], start[name][~rows]), name  # (they would move)
    assert mask.update_fractions()["layers.0.weight"] == pytest.approx(0.5)
    everything = torch.cat(list(chosen.values()))
    assert mask.update_fractions()["all"] == pytest.approx(everything.float().mean().item())  # over all logits


def test_straight_through_gradient_reaches_the_logits_and_full_masks_have_one_logit_per_weight():
    for per in ("row", "weight"):
        model = mlp(transform=True)
        learner = learner_for(
            model, lr=0.1, steps=2, task="regression", fast=W_ONLY, transforms=[{"name": "subspace-mask", "per": per}]
        )
        mask = learner.inner.transforms[0]
        for name in mask.names:
            expected = model.get_parameter(name).shape[:1] if per == "row" else model.get_parameter(name).shape
            assert mask.logits[name.replace(".", "__")].shape == expected
        torch.manual_seed(3)
        learner.meta_backward(random_regression_batch(tasks=4))
        grads = [z.grad for z in mask.logits.values()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_mask_sampling_follows_its_bernoulli_law():
    torch.manual_seed(0)
    mask = SubspaceMask({"w.weight": torch.zeros(20000, 1)}, per="row")
    with torch.no_grad():
        mask.logits["w__weight"].fill_(1.0)
    m = mask.init({"w.weight": torch.zeros(20000, 1)})["w.weight"]
    p = 1 / (1 + math.exp(-1.0))
    assert abs(m.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / 20000)
    assert set(torch.unique(m.detach()).tolist()) <= {0.0, 1.0}


def test_composes_with_meta_sgd_and_vmap_gives_the_same_numbers():
    """MT-net (deterministic mask at +-inf) + DropGrad at p=0 + Meta-SGD: loop and vmap agree."""
    batch = random_regression_batch(tasks=3)
    grads = {}
    for strategy in ("loop", "vmap"):
        model = mlp(transform=True)
        rule = build_inner_rule(
            {n: p for n, p in model.named_parameters() if not n.startswith(("transforms", "head_transform"))},
            step="meta-sgd",
            lr=0.05,
            steps=2,
            transforms=[{"name": "subspace-mask"}, {"name": "dropgrad", "p": 0.0}],
        ).double()
        with torch.no_grad():
            for zeta in rule.transforms[0].logits.values():
                zeta.copy_(torch.where(torch.arange(zeta.numel()) % 3 == 0, -math.inf, math.inf))
        learner = BilevelLearner(model, rule, task="regression", inner_steps=2, fast=W_ONLY, strategy=strategy)
        learner.meta_backward(batch)
        grads[strategy] = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    assert grads["loop"].keys() == grads["vmap"].keys()
    for name, g in grads["loop"].items():
        assert torch.allclose(g, grads["vmap"][name], rtol=1e-9, atol=1e-12), name
    assert any(name.startswith("inner.transforms.2.lr") for name in grads["loop"])  # Meta-SGD alphas learn


def test_dropgrad_layer_groups_of_table_2():
    from metareg.nets import ConvNet

    net = ConvNet(5, 1, 28, channels=4)
    names, groups = [n for n, _ in net.named_parameters()], net.layer_groups()
    fast = dict.fromkeys(names, torch.zeros(1))

    def chosen(layers):
        return DropGrad(fast, layers=layers, groups=groups).names

    assert chosen("fc") == ["head.weight", "head.bias"]
    assert chosen("last-block+fc") == [n for n in names if n.startswith(("blocks.3.", "head."))]
    assert chosen("first-block") == [n for n in names if n.startswith("blocks.0.")]
    assert chosen("full") == names
    with pytest.raises(Exception, match="matches no"):
        DropGrad(fast, layers="middle", groups=groups)


@pytest.mark.parametrize("per", ["row", "weight"])
def test_straight_through_gradient_of_the_logits_is_the_soft_relaxations_gradient(per, monkeypatch):
    """Eq. 3.8-3.9 as a straight-through estimator: the forward pass uses the hard mask
    m = 1[zeta + g1 - g2 > 0] and zeta's gradient is the soft value's, sigmoid((zeta + g1 - g2) / c):
    dL/dzeta = dL/dm * sigmoid'(l / c) / c, with dL/dm taken at the hard mask (summed over a row's
    weights and bias for per="row"). The reference unrolls the inner loop with plain autograd and the
    masks as leaves, on the same Gumbel draws (recorded from ``_gumbel``)."""
    import metareg.inner.mask as mask_module

    c, lr, steps = 0.6, 0.1, 2  # c != 1: a forgotten temperature shows
    draws = []
    original = mask_module._gumbel

    def recorded(shape, like):
        g = original(shape, like)
        draws.append(g.detach().clone())
        return g

    monkeypatch.setattr(mask_module, "_gumbel", recorded)
    model = mlp(transform=True)
    learner = learner_for(
        model,
        lr=lr,
        steps=steps,
        task="regression",
        fast=W_ONLY,
        transforms=[{"name": "subspace-mask", "per": per, "temperature": c}],
    )
    mask = learner.inner.transforms[0]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for zeta in mask.logits.values():
            zeta.copy_(torch.randn(zeta.shape, generator=gen, dtype=zeta.dtype))
    batch = random_regression_batch(tasks=1)
    torch.manual_seed(2)
    metrics = learner.meta_backward(batch)
    assert len(draws) == 2 * len(mask.names)  # one mask per task (g1, g2 per logit), kept for every inner step

    # Reference: the masks are leaves with the hard values; the logits only enter through them.
    start = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    logit, hard = {}, {}
    for i, name in enumerate(mask.names):
        logit[name] = mask.logits[name.replace(".", "__")].detach() + draws[2 * i] - draws[2 * i + 1]
        hard[name] = (logit[name] > 0).double().requires_grad_()
    masks = {}
    for name in mask.names:
        masks[name] = hard[name].view(-1, *[1] * (start[name].dim() - 1)) if per == "row" else hard[name]
        if per == "row":
            masks[name.removesuffix("weight") + "bias"] = hard[name]
    fast = [n for n in start if n.startswith(("layers.", "head."))]
    x, y = batch.support_x[0], batch.support_y[0]
    params = dict(start)
    for _ in range(steps):
        grads = torch.autograd.grad(
            F.mse_loss(functional_call(model, params, (x,)), y), [params[n] for n in fast], create_graph=True
        )
        params = params | {n: params[n] - lr * (masks[n] * g if n in masks else g) for n, g in zip(fast, grads)}
    query_loss = F.mse_loss(functional_call(model, params, (batch.query_x[0],)), batch.query_y[0])
    assert torch.allclose(metrics["loss"], query_loss, rtol=1e-12, atol=0)  # the forward pass is the hard mask's
    d_mask = dict(zip(mask.names, torch.autograd.grad(query_loss, [hard[n] for n in mask.names])))
    values = torch.cat([hard[n].detach().flatten() for n in mask.names])
    assert 0 < values.sum() < values.numel()  # both kept and frozen rows/weights are covered
    for name in mask.names:
        s = torch.sigmoid(logit[name] / c)
        expected = d_mask[name] * s * (1 - s) / c
        got = mask.logits[name.replace(".", "__")].grad
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-14, msg=name)


def test_dropgrad_multiplies_each_gradient_element_by_its_own_noise():
    """g' = g o n on a non-constant gradient: zero entries stay exactly zero, and g'/g follows the
    noise law (mean 1, variance p / (1 - p)) whatever the size of g (additive noise would not)."""
    p, n = 0.3, 200_000
    var = p / (1 - p)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp(
        2 * torch.randn(n, generator=gen, dtype=torch.float64)
    )
    g[::7] = 0.0
    for kind in ("binary", "gaussian"):
        torch.manual_seed(0)
        out = DropGrad({"w": torch.zeros(1)}, p=p, kind=kind).update({"w": g}, None, 0)[0]["w"]
        zero = g == 0
        assert torch.equal(out[zero], g[zero])
        ratio = out[~zero] / g[~zero]
        m = ratio.numel()
        assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(var / m), kind
        assert abs(ratio.var().item() - var) < 5 * math.sqrt(4 * var**2 / m) + 5 * math.sqrt(var**2 * 3 / m), kind
        if kind == "binary":
            kept = out[~zero] != 0
            torch.testing.assert_close(
                out[~zero][kept], g[~zero][kept] / (1 - p), rtol=1e-15, atol=0
            )  # g / (1 - p) where kept
            assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / m)
        # The noise does not depend on the gradient's size: same law for small and large |g|.
        small = g[~zero].abs() < g[~zero].abs().median()
        assert abs(ratio[small].mean().item() - ratio[~small].mean().item()) < 5 * math.sqrt(2 * var / (m / 2)), kind


def test_dropgrad_draws_fresh_noise_at_every_inner_step():
    """Two update calls (steps 0 and 1 of one task, same gradients) drop independent elements: the
    fraction dropped by both is p^2, not p (reused noise); and inside a learner's inner loop each
    step's gradient gets its own mask."""
    p, n = 0.3, 100_000
    drop = DropGrad({"w": torch.zeros(1)}, p=p, kind="binary")
    grads = {"w": torch.ones(n, dtype=torch.float64)}
    torch.manual_seed(0)
    state = drop.init(grads)
    first, state = drop.update(grads, state, 0)
    second, _ = drop.update(grads, state, 1)
    both = ((first["w"] == 0) & (second["w"] == 0)).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)

    # The learner's inner loop: record each step's gradient before and after DropGrad.
    model = mlp()
    learner = learner_for(
        model, lr=0.05, steps=3, task="regression", transforms=[{"name": "dropgrad", "p": 0.5, "kind": "binary"}]
    )
    drop, sgd = learner.inner.transforms
    seen = []
    drop_update, sgd_update = drop.update, sgd.update

    def dropping(grads, state, step):
        seen.append({"raw": grads})
        return drop_update(grads, state, step)

    def stepping(grads, state, step):
        seen[-1]["dropped"] = grads
        return sgd_update(grads, state, step)

    drop.update, sgd.update = dropping, stepping
    batch = random_regression_batch(tasks=1)
    torch.manual_seed(1)
    learner.adapt(learner.initial_params(), batch.support_x[0], batch.support_y[0])
    assert len(seen) == 3
    kept = [torch.cat([(rec["dropped"][k] != 0).flatten() for k in rec["raw"]]) for rec in seen]
    for rec in seen:
        for k, g in rec["raw"].items():  # g' = g o n with n in {0, 2}
            assert torch.equal(rec["dropped"][k], g * (rec["dropped"][k] != 0) * 2), k
    assert all(0 < m.sum() < m.numel() for m in kept)
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])


def test_maml_plus_plus_per_step_step_sizes_are_used_in_order_and_learned():
    """``inner.step=per-step`` (MAML++'s LSLR): one step size per inner step and parameter tensor,
    starting at ``lr``; step k uses its own size (steps past the last, at meta-test, reuse the last);
    the meta-gradient reaches every one of them, equal to a hand-unrolled reference (float64). It
    had no test at all (found by mutation testing: all its mutants had no test)."""
    from metareg.inner.base import param_key

    batch = random_regression_batch(tasks=1)
    x, y = batch.support_x[0], batch.support_y[0]
    model = mlp()
    learner = learner_for(model, step="per-step", lr=0.1, steps=3, task="regression")
    names = learner.fast_names
    sizes = {n: learner.inner.transforms[-1].lr[param_key(n)] for n in names}
    assert all(v.tolist() == [0.1] * 3 for v in sizes.values())
    with torch.no_grad():
        for i, v in enumerate(sizes.values()):
            v.copy_(torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64) * (1 + i / 10))
    lrs = {n: v.detach().clone().requires_grad_() for n, v in sizes.items()}
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for k in range(5):  # 5 steps from 3 sizes: steps 3 and 4 reuse the last
        loss = F.mse_loss(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        params = params | {n: params[n] - lrs[n][min(k, 2)] * g for n, g in zip(names, grads)}
        if k == 2:
            three = {n: t.detach() for n, t in params.items()}
    for steps, expected in ((3, three), (5, params)):
        adapted = learner.adapt(learner.initial_params(), x, y, steps=steps, create_graph=False)
        for n in names:
            torch.testing.assert_close(adapted[n].detach(), expected[n].detach(), rtol=1e-12, atol=1e-14)
    # The meta-gradient of 5 steps with 5 sizes, the last three equal: summed, they are the reference's third.
    query = F.mse_loss(functional_call(model, params, (batch.query_x[0],)), batch.query_y[0])
    expected = dict(zip(names, torch.autograd.grad(query, [lrs[n] for n in names])))
    learner = learner_for(model, step="per-step", lr=0.1, steps=5, task="regression")
    sizes = {n: learner.inner.transforms[-1].lr[param_key(n)] for n in names}
    with torch.no_grad():
        for n, v in sizes.items():
            v.copy_(torch.cat([lrs[n].detach(), lrs[n].detach()[2:].repeat(2)]))
    learner.meta_backward(batch)
    for n, v in sizes.items():
        got = torch.cat([v.grad[:2], v.grad[2:].sum(0, keepdim=True)])
        assert got.abs().min() > 0, n
        torch.testing.assert_close(got, expected[n], rtol=1e-9, atol=1e-14, msg=n)


def test_feature_dropout_factories_and_defaults():
    """`dropout` and `spatial-dropout` put a Dropout in every hidden block and none at the output,
    spatial only for the second; binary noise takes the values 0 and 1 / (1 - p) only; the class
    defaults are p = 0.1, binary; a bad rate names the dropout. Kills the dropout mutants that
    survived mutmut."""
    from helpers import tiny_conv
    from metareg.errors import ConfigError
    from metareg.nets.slots import FeaturePerturbation
    from metareg.perturb import Dropout, build_perturbation

    for name, spatial in (("dropout", False), ("spatial-dropout", True)):
        model = tiny_conv(perturbation=build_perturbation(name, {"p": 0.3}))
        assert all(isinstance(b.perturb, Dropout) and b.perturb.spatial == spatial for b in model.blocks)
        assert type(model.head_perturb) is FeaturePerturbation
    pre = torch.ones(50, 4, 6, 6, dtype=torch.float64)
    torch.manual_seed(0)
    values = set(torch.unique(Dropout(0.3, "binary")(pre, pre, sample=True)).tolist())
    assert values == {0.0, 1 / 0.7}
    default = Dropout()
    assert (default.p, default.kind, default.spatial) == (0.1, "binary", False)
    with pytest.raises(ConfigError, match="dropout rate p must be in"):
        Dropout(1.0)


def test_dropgrad_starts_at_its_full_rate_names_its_errors_and_follows_the_learners_progress():
    """A DropGrad with the linear schedule is at its full rate until told otherwise; a bad schedule
    and a layer pattern that matches nothing are refused by name; ``BilevelLearner.set_training_
    progress`` reaches both the inner rule and the model's scheduled perturbations. Kills the
    DropGrad and set_training_progress mutants that survived mutmut."""
    from metareg.errors import ConfigError
    from metareg.perturb import build_perturbation

    assert DropGrad({"w": torch.zeros(1)}, p=0.4, schedule="linear").rate == 0.4
    with pytest.raises(ConfigError, match="DropGrad schedule must be constant or linear, got 'cosine'"):
        DropGrad({"w": torch.zeros(1)}, schedule="cosine")
    with pytest.raises(ConfigError, match=r"^DropGrad layer selection 'middle\.\*' matches no fast parameter; "):
        DropGrad({"a.weight": torch.zeros(1)}, layers=["middle.*"])
    from helpers import tiny_conv

    model = tiny_conv(perturbation=build_perturbation("dropblock", {"p": 0.2, "block_size": 3, "schedule": "linear"}))
    learner = learner_for(model, transforms=[{"name": "dropgrad", "p": 0.4, "schedule": "linear"}])
    learner.set_training_progress(0.25)
    assert learner.inner.transforms[0].rate == pytest.approx(0.1)
    assert all(block.perturb.rate == pytest.approx(0.05) for block in model.blocks)


def test_per_step_step_sizes_under_vmap_equal_the_loop():
    """The vmap strategy's inner loop (``torch.func.grad``) hands each step its index too: per-step
    step sizes give the loop's meta-gradient (kills a mutant that survived mutmut)."""
    from metareg.inner.base import param_key

    grads = {}
    for strategy in ("loop", "vmap"):
        model = mlp()
        learner = learner_for(model, step="per-step", lr=0.1, steps=3, task="regression", strategy=strategy)
        with torch.no_grad():
            for v in learner.inner.transforms[-1].lr.values():
                v.copy_(torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64))
        learner.meta_backward(random_regression_batch(tasks=2))
        grads[strategy] = {n: learner.inner.transforms[-1].lr[param_key(n)].grad for n in learner.fast_names}
    for name, g in grads["loop"].items():
        torch.testing.assert_close(grads["vmap"][name], g, rtol=1e-9, atol=1e-14)


def test_inner_rule_configuration_errors_name_the_problem_and_transforms_see_the_layer_groups():
    """`build_inner_rule`: a transform without a name, with an unknown option, or an unknown step are
    refused in one line naming what is available; transforms choose layers by the backbone's groups.
    Kills the registry mutants that survived mutmut (inner/registry.py)."""
    from metareg.errors import ConfigError
    from metareg.nets import ConvNet

    fast = {"w": torch.zeros(1)}
    cases = [
        ({"transforms": [{"p": 0.1}]}, "unknown gradient transform None; available: dropgrad, subspace-mask"),
        (
            {"transforms": [{"name": "dropgrad", "bogus": 1}]},
            "unknown option 'bogus' for gradient transform 'dropgrad'",
        ),
        ({"step": "adam"}, "unknown inner step 'adam'; choose one of sgd, meta-sgd, per-step"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_inner_rule(fast, **({"step": "sgd", "lr": 0.1, "steps": 1} | options))
    net = ConvNet(5, 1, 28, channels=4)
    rule = build_inner_rule(
        dict(net.named_parameters()),
        step="sgd",
        lr=0.1,
        steps=1,
        transforms=[{"name": "dropgrad", "layers": "last-block"}],
        groups=net.layer_groups(),
    )
    assert rule.transforms[0].names == [n for n, _ in net.named_parameters() if n.startswith("blocks.3.")]


def test_a_registered_transform_is_built_by_name_and_its_fixed_arguments_are_not_options():
    """`register` adds a gradient transform that `build_inner_rule` builds by name with the fast
    weights and the layer groups; a second registration of the name is refused; the arguments the
    registry fills itself (fast_params, groups) are not options; a ValueError of the factory becomes
    one ConfigError naming the transform. Kills the registry mutants that survived the second mutmut
    pass (registration inverted or dropped, the fixed names dropped, the error message dropped)."""
    from metareg.errors import ConfigError
    from metareg.inner import registry
    from metareg.inner.base import GradientTransform

    built = {}

    class Scale(GradientTransform):
        def __init__(self, fast_params, *, groups=None, factor: float = 2.0):
            super().__init__()
            if factor <= 0:
                raise ValueError(f"factor must be positive, got {factor}")
            built.update(names=sorted(fast_params), groups=groups, factor=factor)

    fast = {"w": torch.zeros(1), "b": torch.zeros(1)}
    try:
        assert registry.register("test-scale")(Scale) is Scale
        with pytest.raises(ValueError, match="gradient transform 'test-scale' registered twice"):
            registry.register("test-scale")(Scale)
        rule = build_inner_rule(
            fast, step="sgd", lr=0.1, steps=1, transforms=[{"name": "test-scale", "factor": 3.0}], groups={"all": ["w"]}
        )
        assert isinstance(rule.transforms[0], Scale)
        assert built == {"names": ["b", "w"], "groups": {"all": ["w"]}, "factor": 3.0}
        for fixed in ("fast_params", "groups"):
            with pytest.raises(ConfigError, match=f"unknown option '{fixed}' for gradient transform 'test-scale'"):
                build_inner_rule(fast, step="sgd", lr=0.1, steps=1, transforms=[{"name": "test-scale", fixed: {}}])
        with pytest.raises(
            ConfigError, match="bad options for gradient transform 'test-scale': factor must be positive"
        ):
            build_inner_rule(fast, step="sgd", lr=0.1, steps=1, transforms=[{"name": "test-scale", "factor": -1.0}])
    finally:
        registry._TRANSFORMS.pop("test-scale", None)
