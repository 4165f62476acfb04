"""DropGrad, T-nets and MT-nets: noise laws, exact reductions to MAML, masks, composition."""

import math

import pytest
import torch

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
    learner = learner_for(model, lr=0.1, steps=1, task="regression", fast=W_ONLY,
                          transforms=[{"name": "subspace-mask", "per": "row"}])
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
    unmasked = learner_for(model, lr=0.1, steps=1, task="regression", fast=W_ONLY).adapt(start, batch.support_x[0], batch.support_y[0])
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
        learner = learner_for(model, lr=0.1, steps=2, task="regression", fast=W_ONLY,
                              transforms=[{"name": "subspace-mask", "per": per}])
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
            step="meta-sgd", lr=0.05, steps=2,
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
    from metareg.inner.dropgrad import layer_group
    from metareg.nets import ConvNet

    names = [n for n, _ in ConvNet(5, 1, 28, channels=4).named_parameters()]
    assert layer_group("fc", names) == ["head.*"]
    assert layer_group("last-block+fc", names) == ["blocks.3.*", "head.*"]
    assert layer_group("first-block", names) == ["blocks.0.*"]
    drop = DropGrad(dict.fromkeys(names, torch.zeros(1)), layers="last-block+fc")
    assert drop.names == [n for n in names if n.startswith(("blocks.3.", "head."))]
    with pytest.raises(Exception, match="unknown DropGrad layer group"):
        DropGrad(dict.fromkeys(names, torch.zeros(1)), layers="middle")
