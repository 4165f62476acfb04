"""Meta-Dropout (Eq. 5-6, Algorithms 1-2) and the noise ablations of its Table 3."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_tensors, final_params, learner_for, random_image_batch, tiny, tiny_conv
from metareg.errors import ConfigError
from metareg.nets import LayerInfo
from metareg.perturb import MultiplicativeNoise, WeightGaussian, build_perturbation

REF_FAST = ["blocks.*.conv.*", "head.weight", "head.bias"]
CONV = LayerInfo(0, "conv", 3, 5, kernel_size=3, padding=1)


def softplus_normal_moments(mu: float) -> tuple[float, float]:
    """Mean and variance of Softplus(a), a ~ N(mu, 1), by numerical integration."""
    a = torch.linspace(mu - 12, mu + 12, 200001, dtype=torch.float64)
    density = torch.exp(-0.5 * (a - mu) ** 2) / math.sqrt(2 * math.pi)
    z = F.softplus(a)
    mean = torch.trapezoid(z * density, a).item()
    return mean, torch.trapezoid((z - mean) ** 2 * density, a).item()


@pytest.mark.parametrize("mu", [-2.0, 0.0, 1.5])
def test_noise_law_is_softplus_of_unit_gaussian_around_mu(mu):
    noise = MultiplicativeNoise(CONV).double()
    with torch.no_grad():
        noise.phi.weight.zero_()
        noise.phi.bias.fill_(mu)  # mu(h) = mu everywhere
    torch.manual_seed(0)
    h = torch.randn(50, 3, 20, 20, dtype=torch.float64)
    z = noise(torch.ones(50, 5, 20, 20, dtype=torch.float64), h, sample=True)  # pre = 1: the output is z
    mean, var = softplus_normal_moments(mu)
    n = z.numel()  # 100 000 independent draws
    assert abs(z.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert z.var().item() == pytest.approx(var, rel=0.03)
    # the query path: a = mu exactly, z = Softplus(mu)
    zbar = noise(torch.ones(2, 5, 4, 4, dtype=torch.float64), h[:2, :, :4, :4], sample=False)
    assert torch.allclose(zbar, torch.full_like(zbar, F.softplus(torch.tensor(mu)).item()))


def test_learned_variance_scales_the_gaussian():
    noise = build_perturbation("meta-dropout-learned-variance")(CONV).double()
    with torch.no_grad():
        for layer, value in ((noise.phi, 0.3), (noise.phi_sigma, math.log(math.expm1(0.5)))):  # sigma = 0.5
            layer.weight.zero_()
            layer.bias.fill_(value)
    torch.manual_seed(1)
    a = torch.log(
        torch.expm1(
            noise.noise(
                torch.ones(40, 5, 20, 20, dtype=torch.float64),
                torch.randn(40, 3, 20, 20, dtype=torch.float64),
                sample=True,
            )
        )
    )
    assert a.mean().item() == pytest.approx(0.3, abs=0.01)
    assert a.std().item() == pytest.approx(0.5, rel=0.02)


def test_block_follows_the_reference_placement_bn_of_f_times_z():
    model = tiny_conv(perturbation=build_perturbation("meta-dropout-deterministic"), norm_scale=False)
    block, x = model.blocks[0], torch.randn(6, 1, 8, 8, dtype=torch.float64)
    f = block.conv(x)
    expected = F.relu(F.max_pool2d(block.norm(f * F.softplus(block.perturb.phi(x))), 2))
    assert torch.allclose(block(x, sample=True), expected)


def test_query_path_is_deterministic_and_support_path_is_not():
    model = tiny_conv(perturbation=build_perturbation("meta-dropout"))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(model(x, sample=False), model(x, sample=False))
    assert not torch.equal(model(x, sample=True), model(x, sample=True))


def test_phi_gets_gradients_in_second_order_and_first_order_is_refused():
    model = tiny_conv(perturbation=build_perturbation("meta-dropout"), init="truncated_normal", norm_scale=False)
    learner = learner_for(model, fast=REF_FAST, mc_samples=1)
    learner.meta_backward(random_image_batch())
    phi = {n: p for n, p in model.named_parameters() if ".phi." in n}
    assert len(phi) == 2 * 2 + 2  # two conv blocks (weight, bias) and the output layer's sigma
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.values())
    with pytest.raises(ConfigError, match="first-order"):
        learner_for(model, fast=REF_FAST, first_order=True)
    learner_for(
        tiny_conv(perturbation=build_perturbation("fixed-gaussian")), first_order=True
    )  # nothing to learn: fine


def test_inner_steps_never_change_phi_or_batch_norm():
    model = tiny_conv(perturbation=build_perturbation("meta-dropout"), norm_scale=False)
    learner = learner_for(model, fast=REF_FAST, steps=3)
    batch = random_image_batch()
    start = learner.initial_params()
    adapted = learner.adapt(start, batch.support_x[0], batch.support_y[0])
    for name in start:
        moved = not torch.equal(adapted[name], start[name])
        assert moved == (name in learner.fast_names), name
    assert not any(".phi." in n or ".norm." in n for n in learner.fast_names)


def test_s_sample_inner_loss_is_the_mean_of_s_single_sample_losses():
    learner = learner_for(tiny_conv(perturbation=build_perturbation("meta-dropout")), fast=REF_FAST)
    batch, params = random_image_batch(), learner.initial_params()
    x, y = batch.support_x[0], batch.support_y[0]
    torch.manual_seed(3)
    averaged = learner.inner_loss(params, x, y, samples=5)
    torch.manual_seed(3)
    singles = [learner.inner_loss(params, x, y, samples=1) for _ in range(5)]
    assert torch.allclose(averaged, torch.stack(singles).mean())
    assert torch.stack(singles).std() > 0  # the samples differ


EXPECTED_PARAMETERS = {  # perturbation -> the perturbation parameters of a 2-block ConvNet, and nothing else
    "none": set(),
    "meta-dropout": {
        "blocks.0.perturb.phi.weight",
        "blocks.0.perturb.phi.bias",
        "blocks.1.perturb.phi.weight",
        "blocks.1.perturb.phi.bias",
        "head_perturb.phi.weight",
        "head_perturb.phi.bias",
    },
    "meta-dropout-deterministic": {
        "blocks.0.perturb.phi.weight",
        "blocks.0.perturb.phi.bias",
        "blocks.1.perturb.phi.weight",
        "blocks.1.perturb.phi.bias",
    },
    "meta-dropout-learned-variance": {
        f"blocks.{i}.perturb.{p}.{w}" for i in (0, 1) for p in ("phi", "phi_sigma") for w in ("weight", "bias")
    }
    | {"head_perturb.phi.weight", "head_perturb.phi.bias"},
    "fixed-gaussian": set(),
    "independent-gaussian": {"blocks.0.perturb.mu", "blocks.1.perturb.mu"},
    "weight-gaussian": {"blocks.0.perturb.rho", "blocks.1.perturb.rho", "head_perturb.rho"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_each_ablation_has_its_parameters_and_none_of_the_others(name):
    model = tiny_conv(perturbation=build_perturbation(name))
    got = {n for n in dict(model.named_parameters()) if "perturb" in n}
    assert got == EXPECTED_PARAMETERS[name]
    shapes = dict(model.named_parameters())
    if name == "independent-gaussian":
        assert shapes["blocks.0.perturb.mu"].shape == (4,)  # one mu per channel
    if name == "weight-gaussian":
        assert shapes["blocks.0.perturb.rho"].shape == model.blocks[0].conv.weight.shape  # one sigma per weight
    if name == "meta-dropout":
        assert shapes["blocks.1.perturb.phi.weight"].shape == model.blocks[1].conv.weight.shape  # phi mirrors theta
        assert shapes["head_perturb.phi.weight"].shape == (1, model.feature_dim)  # one column shared by the classes


def test_weight_gaussian_is_a_gaussian_weight_sample():
    layer = WeightGaussian(LayerInfo(0, "dense", 3, 2), init_std=0.5).double()
    h = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).expand(40000, 3)
    torch.manual_seed(0)
    out = layer(torch.zeros(40000, 2, dtype=torch.float64), h, sample=True)
    # one weight sample per forward: every row sees the same W~, so compare over many forwards
    outs = torch.cat([layer(torch.zeros(1, 2, dtype=torch.float64), h[:1], sample=True) for _ in range(20000)])
    assert out.std(0).max() == 0  # shared within a forward pass
    assert outs.var(0).tolist() == pytest.approx([0.25 * (1 + 4 + 0.25)] * 2, rel=0.05)  # sum_j h_j^2 sigma^2
    assert torch.equal(
        layer(torch.ones(2, 2, dtype=torch.float64), h[:2], sample=False), torch.ones(2, 2, dtype=torch.float64)
    )


def test_weight_gaussian_defaults_refusal_and_strided_layers():
    """Weight Gaussian starts at sigma = 0.01 (class and factory), refuses sigma <= 0 by name, and
    follows its layer's stride, alone and with stacked copies (kills the mutants that survived
    mutmut: a zero sigma would make rho = log(0))."""
    from metareg.nets.layers import stacked_copies

    info = LayerInfo(0, "conv", 3, 4, kernel_size=3, stride=2, padding=1)
    for layer in (WeightGaussian(info), build_perturbation("weight-gaussian")(info)):
        torch.testing.assert_close(F.softplus(layer.rho), torch.full_like(layer.rho, 0.01))
    with pytest.raises(ConfigError, match=r"weight-gaussian init_std must be > 0, got 0\.0"):
        WeightGaussian(info, init_std=0.0)
    layer = WeightGaussian(info, init_std=0.5).double()
    h = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    pre = torch.zeros(4, 4, 4, 4, dtype=torch.float64)  # a stride-2 convolution's output
    assert layer(pre, h, sample=True).shape == pre.shape
    with stacked_copies(2):
        assert layer(pre, h, sample=True).shape == pre.shape


def test_fixed_and_independent_gaussian_queries_use_a_equals_mu():
    for name, expected in (("fixed-gaussian", math.log(2.0)), ("independent-gaussian", math.log(2.0))):
        noise = build_perturbation(name)(CONV).double()
        pre = torch.ones(2, 5, 3, 3, dtype=torch.float64)
        assert torch.allclose(noise(pre, torch.randn(2, 3, 3, 3, dtype=torch.float64), sample=False), pre * expected)


def test_meta_sgd_with_meta_dropout_learns_step_sizes_and_phi():
    model = tiny_conv(perturbation=build_perturbation("meta-dropout"))
    learner = learner_for(model, step="meta-sgd", fast=REF_FAST)
    learner.meta_backward(random_image_batch())
    grads = {n: p.grad for n, p in learner.named_parameters()}
    assert any("inner" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())  # Meta-SGD's alpha
    assert grads["model.blocks.0.perturb.phi.weight"].abs().sum() > 0


def test_deterministic_meta_dropout_same_meta_gradient_batched_and_unbatched():
    grads = {}
    for strategy in ("loop", "vmap"):
        model = tiny_conv(perturbation=build_perturbation("meta-dropout-deterministic"), norm_scale=False)
        learner = learner_for(model, fast=REF_FAST, strategy=strategy)
        learner.meta_backward(random_image_batch(tasks=3))
        grads[strategy] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["loop"].items():
        assert torch.allclose(g, grads["vmap"][name], rtol=1e-6, atol=1e-10), name


@pytest.mark.slow
def test_meta_dropout_run_resumes_exactly(tmp_path):
    extra = (
        "perturb.name=meta-dropout",
        "inner.eval_mc_samples=2",
        "model.options={channels: 4, norm_scale: false}",
        "inner.fast=[blocks.*.conv.*, head.weight, head.bias]",
    )
    from metareg.runs.episodic import train

    train(tiny("train.steps=6", "train.checkpoint_every=3", *extra), tmp_path / "straight", progress=False)
    train(tiny("train.steps=3", "train.checkpoint_every=3", *extra), tmp_path / "split", progress=False)
    train(tiny("train.steps=6", "train.checkpoint_every=3", *extra), tmp_path / "split", resume=True, progress=False)
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
    assert any(k.startswith("param.") and ".phi." in k for k in a)
    assert_same_tensors(a, b)


def test_boundary_coordinates_put_the_classifier_decision_on_the_vertical_line():
    from metareg.viz.boundary import boundary_coordinates

    torch.manual_seed(0)
    h, w, b = (
        torch.randn(40, 6, dtype=torch.float64),
        torch.randn(2, 6, dtype=torch.float64),
        torch.randn(2, dtype=torch.float64),
    )
    x, y, x_db = boundary_coordinates(h, w, b)
    margin = (h @ w.T + b)[:, 0] - (h @ w.T + b)[:, 1]  # > 0: class c1 wins
    assert torch.allclose((x - x_db) * (w[0] - w[1]).norm(), margin)  # Eq. 10 and 12
    assert y.shape == (40,)


@pytest.mark.slow
def test_feature_and_boundary_plots_from_a_trained_run(tmp_path):
    from metareg.runs.episodic import train
    from metareg.runs.task_view import adapted_task
    from metareg.viz.boundary import plot_boundary
    from metareg.viz.features import plot_features

    run = tmp_path / "run"
    train(tiny("train.steps=2", "perturb.name=meta-dropout", "inner.eval_mc_samples=2"), run, progress=False)
    view = adapted_task(run)
    for path in (plot_features(view, tmp_path / "f.png", layer=1), plot_boundary(view, tmp_path / "b.png", samples=3)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ConfigError, match="--layer"):
        plot_features(view, tmp_path / "x.png", layer=7)


def test_fgsm_moves_every_pixel_by_epsilon_uphill_and_zero_changes_nothing():
    from metareg.evaluate.adversarial import FGSM

    learner = learner_for(tiny_conv(perturbation=build_perturbation("meta-dropout")), fast=REF_FAST)
    batch = random_image_batch(tasks=1)
    x = batch.query_x[0].clamp(0.2, 0.8)  # room to move both ways
    params = learner.adapt(learner.initial_params(), batch.support_x[0], batch.support_y[0], create_graph=False)
    adv = FGSM(0.05)(learner, params, x, batch.query_y[0])
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.05))
    loss = lambda z: learner.loss(learner.query_forward(params, z), batch.query_y[0]).item()  # noqa: E731
    assert loss(adv) > loss(x)
    assert torch.equal(FGSM(0.0)(learner, params, x, batch.query_y[0]), x)
    with pytest.raises(ConfigError):
        FGSM(-1.0)


@pytest.mark.parametrize("kind", ["binary", "gaussian"])
def test_feature_dropout_baselines_have_mean_one_variance_p_over_1_minus_p_and_spatial_masks(kind):
    from metareg.perturb import Dropout

    pre = torch.ones(200, 8, 10, 10, dtype=torch.float64)
    torch.manual_seed(0)
    noise = Dropout(0.3, kind)(pre, pre, sample=True)
    assert noise.mean().item() == pytest.approx(1.0, abs=0.01)
    assert noise.var().item() == pytest.approx(0.3 / 0.7, rel=0.03)
    spatial = Dropout(0.3, kind, spatial=True)(pre, pre, sample=True)
    assert torch.equal(spatial, spatial[:, :, :1, :1].expand_as(spatial))  # one draw per example and channel
    assert torch.equal(Dropout(0.3, kind)(pre, pre, sample=False), pre)  # the query set is untouched
    model = tiny_conv(perturbation=build_perturbation("spatial-dropout", {"p": 0.2, "kind": kind}))
    assert not any("perturb" in n for n, _ in model.named_parameters())  # nothing meta-learned


def test_compare_accepts_different_noise_samples_but_not_different_attacks():
    from metareg.evaluate import EvalResult
    from metareg.runs.episodic import compare

    base = {"data": "omniglot", "episodes": 3, "seed": 1234, "steps": 5}
    a = EvalResult(torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64), base | {"mc_samples": 30})
    b = EvalResult(torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64), base | {"mc_samples": 1})
    assert compare(a, b)["difference"].mean == pytest.approx(1 / 6)  # S is part of the model
    attacked = EvalResult(b.scores, base | {"mc_samples": 1, "attack": "fgsm eps=0.1"})
    with pytest.raises(ConfigError, match="same episodes"):
        compare(a, attacked)


def test_output_layer_noise_is_gaussian_around_the_logits_with_a_softplus_sigma_per_example():
    """The last layer (reference implementation): sampled logits - deterministic logits ~ N(0, sigma^2)
    independently per class, sigma = Softplus(h w_phi + b_phi) per example (one column shared by the
    classes); the deterministic path returns theta's logits exactly."""
    from metareg.perturb import AdditiveGaussianOutput

    noise = build_perturbation("meta-dropout")(LayerInfo(2, "dense", 4, 3, output=True)).double()
    assert isinstance(noise, AdditiveGaussianOutput)
    with torch.no_grad():
        noise.phi.weight.copy_(torch.tensor([[0.8, -0.5, 0.3, 1.0]]))
        noise.phi.bias.fill_(-0.2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64)
    pre = 3 * torch.randn(
        5, 3, generator=g, dtype=torch.float64
    )  # logits far from +-1: multiplicative noise would show
    sigma = F.softplus(h @ torch.tensor([0.8, -0.5, 0.3, 1.0], dtype=torch.float64) - 0.2)[
        :, None
    ]  # [5, 1], closed form
    assert sigma.max() / sigma.min() > 2  # examples with clearly different sigmas
    n = 20000
    torch.manual_seed(0)
    d = noise(pre.repeat(n, 1), h.repeat(n, 1), sample=True).view(n, 5, 3) - pre  # n draws for every (example, class)
    var = (sigma**2).expand(5, 3)
    assert ((d.mean(0)).abs() < 5 * (var / n).sqrt()).all()
    assert ((d.var(0) - var).abs() < 5 * (2 * var**2 / n).sqrt()).all()  # Var of a normal sample variance: 2 s^4 / n
    inside = (d.abs() < sigma).double().mean(0)  # a normal: P(|d| < sigma) = 0.6827
    assert ((inside - 0.6827).abs() < 5 * math.sqrt(0.6827 * 0.3173 / n)).all()
    z = (d / sigma).flatten(1)  # standardized, [n, 15]: independent across classes and examples
    corr = torch.corrcoef(z.T) - torch.eye(15, dtype=torch.float64)
    assert corr.abs().max() < 5 / math.sqrt(n)
    assert torch.equal(noise(pre, h, sample=False), pre)


def test_vmap_meta_backward_draws_each_tasks_noise_independently():
    """``BilevelLearner(strategy="vmap").meta_backward`` samples Meta-Dropout's noise per task: two
    identical tasks in one batch adapt under different noise, so the meta-gradients reaching their
    (identical) support and query images differ; with the deterministic variant they are equal."""
    from metareg.data.tasks import TaskBatch

    one = random_image_batch(tasks=1)
    grads = {}
    for name in ("meta-dropout", "meta-dropout-deterministic"):
        learner = learner_for(
            tiny_conv(perturbation=build_perturbation(name), norm_scale=False), fast=REF_FAST, steps=1, strategy="vmap"
        )
        sx, qx = (t.repeat(2, 1, 1, 1, 1).requires_grad_() for t in (one.support_x, one.query_x))
        torch.manual_seed(0)
        learner.meta_backward(TaskBatch(sx, one.support_y.repeat(2, 1), qx, one.query_y.repeat(2, 1)))
        grads[name] = (sx.grad, qx.grad)
    for g in grads["meta-dropout"]:
        assert g[0].abs().sum() > 0 and not torch.allclose(g[0], g[1], rtol=1e-6, atol=0)
    for g in grads["meta-dropout-deterministic"]:
        assert g[0].abs().sum() > 0
        torch.testing.assert_close(g[0], g[1], rtol=1e-10, atol=1e-14)


def meta_dropout_reference(params, x, noise, *, sample: bool):
    """Meta-Dropout's forward pass (Eq. 5-6 in the reference placement, h = ReLU(pool(BN(f o z)))) on
    the parameter names of a 2-block ``ConvNet``, in plain ``torch.nn.functional`` calls; ``noise``
    yields the recorded standard-normal draws in the engine's order (block 0, block 1, output)."""
    h = x
    for i in range(2):
        p = f"blocks.{i}."
        f = F.conv2d(h, params[p + "conv.weight"], params[p + "conv.bias"], padding=1)
        a = F.conv2d(h, params[p + "perturb.phi.weight"], params[p + "perturb.phi.bias"], padding=1)  # mu(h)
        z = F.softplus(a + next(noise) if sample else a)
        pre = F.batch_norm(f * z, None, None, None, params[p + "norm.bias"], training=True)
        h = F.relu(F.max_pool2d(pre, 2))
    features = h.flatten(1)
    logits = F.linear(features, params["head.weight"], params["head.bias"])
    if not sample:
        return logits
    sigma = F.softplus(F.linear(features, params["head_perturb.phi.weight"], params["head_perturb.phi.bias"]))
    return logits + sigma * next(noise)


def test_meta_dropout_meta_gradient_equals_a_hand_unrolled_reference_on_the_recorded_noise(monkeypatch):
    """The meta-gradient of every meta-parameter (theta, batch norm's shift, phi of every layer) after
    2 inner steps with S = 2 noise samples each, against the same bilevel problem unrolled by hand with
    plain autograd on the engine's recorded draws of eps (float64). Catches a noise generator that
    does not see the gradient through its input, ``phi(h.detach())`` (the first block's theta then
    misses its path through the second block's mu(h)), the same at the output layer's sigma, a
    missing softplus, noise placed after batch norm, and a query pass that samples (each checked:
    the test fails)."""
    draws = []
    real = torch.randn_like

    def recorded(t, **kw):
        draws.append(real(t, **kw))
        return draws[-1]

    monkeypatch.setattr(torch, "randn_like", recorded)
    model = tiny_conv(perturbation=build_perturbation("meta-dropout"), norm_scale=False)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # phi large enough for its terms to matter (its init is std 0.02)
        for name, p in model.named_parameters():
            if ".phi." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    lr, steps, samples = 0.1, 2, 2
    learner = learner_for(model, fast=REF_FAST, lr=lr, steps=steps, mc_samples=samples)
    batch = random_image_batch(tasks=2)
    torch.manual_seed(0)
    metrics = learner.meta_backward(batch)
    assert len(draws) == batch.num_tasks * steps * samples * 3  # two blocks and the output layer per pass

    names, fast = [n for n, _ in model.named_parameters()], learner.fast_names
    leaves = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    noise = iter(draws)
    total = 0.0
    for i in range(batch.num_tasks):
        params = dict(leaves)
        for _ in range(steps):
            loss = sum(
                F.cross_entropy(
                    meta_dropout_reference(params, batch.support_x[i], noise, sample=True), batch.support_y[i]
                )
                for _ in range(samples)
            )
            grads = torch.autograd.grad(loss / samples, [params[n] for n in fast], create_graph=True)
            params = params | {n: params[n] - lr * g for n, g in zip(fast, grads)}
        query = meta_dropout_reference(params, batch.query_x[i], noise, sample=False)
        total = total + F.cross_entropy(query, batch.query_y[i]) / batch.num_tasks
    assert next(noise, None) is None  # every recorded draw replayed, in order
    torch.testing.assert_close(metrics["loss"], total.detach(), rtol=1e-12, atol=0)
    expected = dict(zip(names, torch.autograd.grad(total, [leaves[n] for n in names])))
    for name, p in model.named_parameters():
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-13, msg=name)


def test_multiplicative_noise_defaults_errors_and_shapes():
    """The class's KL weight is 0 by default (no penalty recorded), each bad setting is refused by
    name, a learnable mu per channel gives a noise shaped like the features (one value per channel,
    broadcast over the map), the KL term comes from sampled passes only, the factory's defaults are
    Meta-Dropout's and phi starts as in the reference. Kills the Meta-Dropout mutants that survived
    mutmut."""
    from metareg.nets.slots import recording

    pre, h = torch.ones(2, 5, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    with recording() as record:
        MultiplicativeNoise(CONV).double()(pre, h, sample=True)
    assert MultiplicativeNoise(CONV).kl == 0 and record.penalty == 0
    for options, message in (
        ({"kl": -1.0}, "meta-dropout's KL weight kl must be >= 0, got -1.0"),
        ({"mean": "median"}, "multiplicative-noise mean must be input, channel or zero, got 'median'"),
        ({"variance": "learned"}, "multiplicative-noise variance must be fixed or input, got 'learned'"),
    ):
        with pytest.raises(ConfigError, match=message):
            MultiplicativeNoise(CONV, **options)
    noise = MultiplicativeNoise(CONV, mean="channel").double()
    with torch.no_grad():
        noise.mu.copy_(torch.arange(5, dtype=torch.float64))
    out = noise(pre, h, sample=False)
    assert out.shape == pre.shape
    assert torch.allclose(out, F.softplus(torch.arange(5, dtype=torch.float64)).view(1, 5, 1, 1).expand_as(pre))
    # The KL term (Table 2's beta rows) is added by sampled passes only, beta |mu|^2 / 2 per example.
    beta = MultiplicativeNoise(CONV, kl=0.5).double()
    with recording() as record:
        beta(pre, h, sample=False)
    assert record.penalty == 0
    with recording() as record:
        beta(pre, h, sample=True)
    mu = beta.phi(h)
    torch.testing.assert_close(record.penalty, 0.5 * 0.5 * (mu.expand_as(pre) ** 2).flatten(1).sum(1).mean())
    # The factory's defaults are Meta-Dropout's; phi starts as the reference's (std 0.02, zero biases).
    model = tiny_conv(perturbation=build_perturbation("multiplicative-noise"))
    assert all(
        (b.perturb.mean_kind, b.perturb.stochastic, b.perturb.kl, b.perturb.phi_sigma) == ("input", True, 0.0, None)
        for b in model.blocks
    )
    from metareg.perturb import AdditiveGaussianOutput
    from metareg.perturb.meta_dropout import phi_layer

    assert isinstance(model.head_perturb, AdditiveGaussianOutput)
    torch.manual_seed(0)
    conv, dense = (
        phi_layer(LayerInfo(0, "conv", 64, 64, kernel_size=3, padding=1)),
        phi_layer(LayerInfo(1, "dense", 900, 64)),
    )
    for layer, std in ((conv, 0.02 * 0.8796), (dense, 0.02)):  # a normal truncated at 2 sigma has 0.8796 sigma
        assert layer.weight.std().item() == pytest.approx(std, rel=0.03) and torch.equal(layer.bias, torch.zeros(64))
    assert conv.weight.abs().max() <= 0.04
