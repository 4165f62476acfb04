"""The regularizers the seeds compare against (Mixup, Manifold Mixup, VIB, Information Dropout,
Meta-Dropout's KL rows, inner-loop adversarial training, DropBlock), the attacks (FGSM, PGD in
three norms, EoT) and calibration: laws, closed forms, meta-gradients, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import learner_for, random_image_batch, tiny, tiny_transfer
from metareg.evaluate.calibration import expected_calibration_error, reliability
from metareg.nets import LayerInfo, create_model
from metareg.nets.layers import stacked_copies
from metareg.nets.slots import perturbed_loss, recording
from metareg.perturb import PGD, build_perturbation, fgsm
from metareg.perturb.adversarial import project_l1
from metareg.perturb.information import (
    InformationDropout,
    VariationalBottleneck,
    gaussian_kl,
)
from metareg.perturb.mixup import beta_sample

CONV = LayerInfo(0, "conv", 3, 4, kernel_size=3, padding=1)


def conv4(perturbation: str = "none", options: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(
        "conv4",
        3,
        in_channels=1,
        image_size=8,
        channels=4,
        depth=2,
        perturbation=build_perturbation(perturbation, options or {}),
    ).double()


# --------------------------------------------------------------------------------------- mixup
def test_input_mixup_is_the_model_on_mixed_images_with_mixed_labels():
    """The first block's slot mixes the convolution's output, which is linear in the image: the
    network on x equals the plain network on lam x + (1 - lam) x[partner], exactly."""
    mixed_model, plain = conv4("mixup", {"gamma": 1.0}), conv4()
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(3)
    with recording() as record:
        out = mixed_model(x, sample=True)
    lam, partner = record.mix
    assert torch.equal(partner.sort().values, torch.arange(6)) and lam.unique().numel() == 1
    by_hand = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[partner]
    torch.testing.assert_close(out, plain(by_hand), rtol=1e-12, atol=1e-12)
    # The loss is the cross-entropy of the mixed one-hot labels.
    soft = lam[:, None] * F.one_hot(y, 3) + (1 - lam[:, None]) * F.one_hot(y[partner], 3)
    torch.testing.assert_close(
        perturbed_loss(F.cross_entropy, out, y, record), -(soft * F.log_softmax(out, 1)).sum(1).mean()
    )
    # No training pass (query sets, evaluation): nothing is mixed.
    torch.testing.assert_close(mixed_model(x, sample=True), plain(x))


def test_manifold_mixup_draws_its_layer_uniformly_and_lam_from_beta():
    model = conv4("manifold-mixup", {"gamma": 0.5})
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    with recording():
        model(x, sample=True)
    plan = model.blocks[0].perturb.plan
    assert plan.layers == 3  # two blocks and the classifier
    torch.manual_seed(0)
    with stacked_copies(3000):  # 3000 passes' draws at once
        layers = plan.draw(torch.zeros(3000, 1))["layer"]
    counts = torch.bincount(layers, minlength=3).double()
    assert counts.numel() == 3 and ((counts - 1000).abs() < 5 * math.sqrt(1000 * 2 / 3)).all(), counts
    lam = beta_sample(0.5, 200_000, torch.zeros((), dtype=torch.float64))
    assert abs(lam.mean().item() - 0.5) < 0.005 and abs(lam.var().item() - 1 / (4 * (2 * 0.5 + 1))) < 0.003


def test_stacked_copies_mix_within_each_copy():
    model = conv4("manifold-mixup", {"gamma": 1.0})
    x = torch.rand(12, 1, 8, 8, dtype=torch.float64)
    with stacked_copies(3), recording() as record:
        model(x, sample=True)
    _, partner = record.mix
    assert all(set(partner[4 * s : 4 * s + 4].tolist()) == set(range(4 * s, 4 * s + 4)) for s in range(3))


# ------------------------------------------------------------------------- information theory
def slot_and_inputs(slot, *, batch: int, size: int):
    """The slot in float64 with a noise generator far from zero (std 0.3), a layer input h (3
    channels) and a pre-activation (4 channels) of ``size`` x ``size``."""
    torch.manual_seed(0)
    slot = slot.double()
    with torch.no_grad():
        slot.phi.weight.normal_(std=0.3)
    return (
        slot,
        torch.rand(batch, 3, size, size, dtype=torch.float64),
        torch.randn(batch, 4, size, size, dtype=torch.float64),
    )


def noisy_outputs(slot, pre, h, n: int):
    """n independent draws of the slot's sampled output for one (pre, h) batch: (n, *pre.shape)."""
    return slot(pre.repeat(n, 1, 1, 1), h.repeat(n, 1, 1, 1), sample=True).detach().view(n, *pre.shape)


def test_vib_noise_is_gaussian_with_its_sigma_and_its_kl_has_the_closed_form():
    slot, h, pre = slot_and_inputs(VariationalBottleneck(CONV, beta=1e-3), batch=2, size=5)
    sigma = slot.sigma(h).detach()
    n = 4000
    draws = noisy_outputs(slot, pre, h, n) - pre
    assert ((draws.mean(0)).abs() < 5 * sigma / math.sqrt(n)).all()
    assert ((draws.std(0) / sigma - 1).abs() < 0.08).all() and float(sigma.std()) > 0.01
    with recording() as record:
        slot(pre, h, sample=True)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(pre, sigma), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(record.penalty, 1e-3 * expected.flatten(1).sum(1).mean())
    torch.testing.assert_close(gaussian_kl(pre, sigma), expected.flatten(1).sum(1))
    assert torch.equal(slot(pre, h, sample=False), pre)


def test_information_dropout_is_log_normal_with_its_alpha_and_its_kl_is_minus_log_alpha():
    slot, h, pre = slot_and_inputs(InformationDropout(CONV, beta=1e-2), batch=1, size=4)
    alpha = slot.alpha(h).detach()
    n = 4000
    logs = torch.log(noisy_outputs(slot, pre, h, n) / pre)
    assert (logs.mean(0).abs() < 5 * alpha / math.sqrt(n)).all() and ((logs.std(0) / alpha - 1).abs() < 0.08).all()
    assert float(alpha.max()) <= 0.7
    with recording() as record:
        slot(pre, h, sample=True)
    torch.testing.assert_close(record.penalty, -1e-2 * ((pre > 0).double() * torch.log(alpha)).sum())


def test_meta_dropout_kl_term_is_half_the_squared_mean():
    model = conv4("meta-dropout", {"kl": 1e-2})
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    seen = []  # each block's (pre-activation, input) in the sampled pass
    handles = [
        block.perturb.register_forward_pre_hook(lambda m, args: seen.append((m, args))) for block in model.blocks
    ]
    with recording() as record:
        model(x, sample=True)
    for handle in handles:
        handle.remove()
    expected = sum(1e-2 * 0.5 * (m.mean(pre, h) ** 2).flatten(1).sum(1).mean() for m, (pre, h) in seen)
    assert len(seen) == 2
    torch.testing.assert_close(record.penalty, expected)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("vib", {}),
        ("information-dropout", {}),
        ("meta-dropout", {"kl": 1e-3}),
        ("manifold-mixup", {}),
        ("adversarial", {"epsilon": 0.05}),
    ],
)
def test_baselines_train_in_the_inner_loop_with_meta_learned_parameters_and_test_deterministically(name, options):
    model = conv4(name, options)
    fast = ["blocks.*.conv.*", "head.weight", "head.bias"]
    learner = learner_for(model, fast=fast, eval_mc_samples=2)
    batch = random_image_batch(tasks=2, way=3, shot=2, query=2, size=8)
    torch.manual_seed(0)
    learner.meta_backward(batch)
    extra = [p for n, p in model.named_parameters() if "perturb" in n]
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in extra
    )  # none for mixup / FGSM: they have no parameters
    assert bool(extra) == (name in ("vib", "information-dropout", "meta-dropout"))
    learner.eval()
    torch.manual_seed(1)
    first = learner.query_outputs(batch)
    torch.manual_seed(1)
    assert torch.equal(first, learner.query_outputs(batch))  # evaluation is reproducible for a seed
    params = learner.detached_params()
    assert torch.equal(learner.query_forward(params, batch.query_x[0]), learner.query_forward(params, batch.query_x[0]))


def test_inner_loop_adversarial_training_trains_on_fgsm_support_images():
    model = conv4("adversarial", {"epsilon": 0.1})
    learner = learner_for(model)
    batch = random_image_batch(tasks=1, way=3, shot=2, query=2, size=8)
    x, y = batch.support_x[0], batch.support_y[0]
    params = learner.initial_params()
    plain = learner.loss(model(x), y)
    attacked = model.support_attack(lambda images: learner.loss(model(images), y), x)
    assert (attacked - x).abs().max() <= 0.1 + 1e-12 and learner.loss(model(attacked), y) > plain
    torch.testing.assert_close(learner.inner_loss(params, x, y, 1), learner.loss(model(attacked, sample=True), y))


# ------------------------------------------------------------------------------------- DropBlock
def test_dropblock_drops_about_p_in_contiguous_blocks_and_ramps_up():
    slot = build_perturbation("dropblock", {"p": 0.2, "block_size": 3, "schedule": "linear"})(CONV)
    pre = torch.ones(64, 4, 24, 24, dtype=torch.float64)
    torch.manual_seed(0)
    slot.set_training_progress(1.0)
    out = slot(pre, None, sample=True)
    dropped = (out == 0).double()
    assert abs(dropped.mean().item() - 0.2) < 0.03
    torch.testing.assert_close(out.mean(), torch.tensor(1.0, dtype=torch.float64))  # rescaled: the mean is kept
    # Every dropped unit lies in a dropped 3x3 block.
    blocks = F.avg_pool2d(dropped, 3, stride=1, padding=1) * 9
    covered = F.max_pool2d((blocks > 8.5).double(), 3, stride=1, padding=1)
    assert bool((covered >= dropped).all())
    slot.set_training_progress(0.5)
    assert slot.rate == pytest.approx(0.1) and slot.scheduled
    assert torch.equal(slot(pre, None, sample=False), pre)


# --------------------------------------------------------------------------------------- attacks
def tiny_classifier():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return net, x, y, (lambda images: F.cross_entropy(net(images), y))


@pytest.mark.parametrize(("norm", "epsilon"), [("linf", 0.05), ("l2", 0.5), ("l1", 2.0)])
def test_pgd_stays_in_its_ball_and_raises_the_loss(norm, epsilon):
    _net, x, _y, loss_of = tiny_classifier()
    torch.manual_seed(1)
    adversarial = PGD(norm, epsilon, steps=20)(loss_of, x)
    delta = (adversarial - x).flatten(1)
    size = {"linf": delta.abs().max(1).values, "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}[norm]
    assert (size <= epsilon * (1 + 1e-9)).all() and adversarial.min() >= 0 and adversarial.max() <= 1
    assert loss_of(adversarial) > loss_of(x) + 1e-3


def test_eot_with_one_draw_is_plain_pgd_and_averages_a_stochastic_gradient():
    _, x, _, loss_of = tiny_classifier()
    torch.manual_seed(2)
    a = PGD("linf", 0.05, steps=5, draws=1)(loss_of, x)
    torch.manual_seed(2)
    assert torch.equal(a, PGD("linf", 0.05, steps=5)(loss_of, x))
    calls = []
    PGD("linf", 0.05, steps=2, draws=4)(lambda images: calls.append(1) or loss_of(images), x)
    assert len(calls) == 8  # 2 steps x 4 draws
    assert (
        fgsm(0.1).describe() == "fgsm eps=0.1"
        and PGD("l2", 0.5, steps=7, draws=3).describe() == "pgd-l2 eps=0.5, 7 steps, EoT 3"
    )


def linear_margin_problem(seed: int = 0):
    """A 2-class linear classifier on 16 pixels and 6 images at 0.5 (the pixel range [0, 1] never binds
    for the sizes used): the cross-entropy is a decreasing function of the true class's margin
    m(x) = v_i . x + c, so the best attack in any ball is the one that lowers the margin most, in closed
    form: -eps sign(v) (L-inf), -eps v / |v|_2 (L2), -eps sign(v_j) e_j at j = argmax |v_j| (L1)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Linear(16, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(2, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 16))
        net.bias.zero_()
    x = torch.full((6, 1, 4, 4), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0, 1])

    def loss_of(images):
        return F.cross_entropy(net(images.flatten(1)), y)

    v = (net.weight[y] - net.weight[1 - y]).detach()  # the margin's gradient, per image

    def best(norm, epsilon):
        if norm == "linf":
            delta = -epsilon * v.sign()
        elif norm == "l2":
            delta = -epsilon * v / v.norm(dim=1, keepdim=True)
        else:
            j = v.abs().argmax(1)
            delta = torch.zeros_like(v)
            delta[torch.arange(len(v)), j] = -epsilon * v[torch.arange(len(v)), j].sign()
        return x + delta.view_as(x)

    return x, loss_of, best


@pytest.mark.parametrize(("norm", "epsilon"), [("linf", 0.05), ("l2", 0.3), ("l1", 0.4)])
def test_pgd_reaches_the_closed_form_optimum_of_a_linear_model(norm, epsilon):
    """PGD (10 steps, random start) reaches at least 99% of the loss of the best attack in the ball,
    known in closed form for a linear model (:func:`linear_margin_problem`), and 98% of its gain over
    the clean loss (L2 gets 98.6%: from its random start the part orthogonal to the best direction
    shrinks by the projection only geometrically). Catches (checked, share of the optimal gain): a
    sign step in L2 (70%), a dense sign step in L1 (28%), a random walk (<= 0)."""
    x, loss_of, best = linear_margin_problem()
    optimum = best(norm, epsilon)
    assert {
        "linf": (optimum - x).abs().amax((1, 2, 3)),
        "l2": (optimum - x).flatten(1).norm(dim=1),
        "l1": (optimum - x).abs().sum((1, 2, 3)),
    }[norm].allclose(torch.tensor(epsilon, dtype=torch.float64))
    assert optimum.min() > 0 and optimum.max() < 1  # the pixel range does not bind
    torch.manual_seed(1)
    adversarial = PGD(norm, epsilon, steps=10)(loss_of, x)
    clean, reached, best_loss = loss_of(x).item(), loss_of(adversarial).item(), loss_of(optimum).item()
    assert best_loss > clean + 0.05  # a real gain to measure against
    assert reached <= best_loss + 1e-9  # nothing in the ball beats the closed form
    assert reached >= 0.99 * best_loss
    assert reached - clean >= 0.98 * (best_loss - clean), (reached - clean) / (best_loss - clean)


def test_eot_follows_the_averaged_gradient_of_a_stochastic_loss():
    """EoT: the loss x . w with w ~ N(mu, 3^2) drawn anew at every evaluation; mu = +-1 per pixel, so the
    expected gradient's sign is sign(mu), while a single draw's sign is wrong for 37% of the pixels.
    One FGSM step with 400 draws (the average's noise: 3 / 20 = 0.15 << 1) moves every pixel along
    sign(mu). Catches an EoT that uses only the first draw (checked: about a third of the signs
    flip), or ignores ``draws``."""
    g = torch.Generator().manual_seed(0)
    mu = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0).double().view(1, 1, 8, 8)
    x = torch.full((2, 1, 8, 8), 0.5, dtype=torch.float64)

    def noisy_loss(images):
        return (images * (mu + 3 * torch.randn_like(images))).sum()

    torch.manual_seed(3)
    adversarial = fgsm(0.1, draws=400)(noisy_loss, x)
    assert torch.equal((adversarial - x).sign(), mu.sign().expand_as(x))
    torch.manual_seed(3)
    single = fgsm(0.1)(noisy_loss, x)
    assert ((single - x).sign() != mu.sign()).double().mean() > 0.2  # one draw alone is not enough


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_pgd_random_starts_follow_their_laws(norm):
    """PGD's random start (float64, 4000 examples of 16 pixels): L-inf uniform in [-eps, eps] per
    pixel (mean 0, variance eps^2 / 3); L2 and L1 a radius uniform in [0, eps] per example (its norm:
    mean eps / 2, variance eps^2 / 12) times a direction from the norm's own law, centred: Gaussian for
    L2 (the sample kurtosis of d = 16 normal pixels, which no normalization changes, has mean
    3 (d - 1) / (d + 1) = 2.65) and Laplace for L1 (heavier tails: above 3.5). Kills the random-start
    mutants that survived mutmut: one-sided or shifted L-inf intervals, the other norm's direction
    law or normalization, one radius for the whole batch, a radius multiplied by the norm, a start
    projected on the wrong ball."""
    from metareg.perturb.adversarial import random_start

    n, d, eps = 4000, 16, 0.3
    x = torch.zeros(n, 1, 4, 4, dtype=torch.float64)
    torch.manual_seed(0)
    start = random_start(x, norm, eps)
    assert start.dtype == torch.float64 and start.shape == x.shape
    flat = start.flatten(1)
    assert abs(flat.mean().item()) < 5 * flat.std().item() / math.sqrt(n * d)  # centred
    if norm == "linf":
        assert flat.abs().max() <= eps and flat.min() < -0.99 * eps and flat.max() > 0.99 * eps
        assert flat.var().item() == pytest.approx(eps**2 / 3, rel=0.03)
        return
    size = flat.norm(p=2 if norm == "l2" else 1, dim=1)
    assert size.max() <= eps * (1 + 1e-12)
    assert abs(size.mean().item() - eps / 2) < 5 * eps / math.sqrt(12 * n)  # U(0, eps): sd eps / sqrt(12)
    assert size.var().item() == pytest.approx(eps**2 / 12, rel=0.1)
    unit = flat / size[:, None]  # the directions, on the unit sphere of the norm
    kurtosis = ((unit - unit.mean(1, keepdim=True)) ** 4).mean(1) / unit.var(1, unbiased=False) ** 2
    expected = {"l2": 3 * (d - 1) / (d + 1), "l1": None}[norm]
    if expected is not None:
        assert kurtosis.mean().item() == pytest.approx(expected, rel=0.05)
    else:  # a Laplace direction: heavier-tailed than a Gaussian one on the same sphere
        assert kurtosis.mean().item() > 3.5


def test_attacks_on_a_regression_learner_are_refused_by_name():
    """The attacks raise the cross-entropy of classifiers: a regression learner is refused in one
    line (kills the message mutants that survived mutmut)."""
    from helpers import random_regression_batch, tiny_mlp
    from metareg.errors import ConfigError
    from metareg.evaluate.adversarial import FGSM

    learner = learner_for(tiny_mlp(), task="regression")
    batch = random_regression_batch(tasks=1)
    with pytest.raises(ConfigError, match="the attacks target classifiers; this is a regression run"):
        FGSM(0.1)(learner, learner.initial_params(), batch.query_x[0], batch.query_y[0])


def test_attack_descriptions_name_fgsm_only_for_fgsm():
    """``describe()`` (what the protocol records) says "fgsm" only for one L-inf step of size epsilon
    from x, and names EoT from 2 draws on. Kills the description mutants that survived mutmut."""
    assert fgsm(0.1).describe() == "fgsm eps=0.1" and fgsm(0.0).describe() == "fgsm eps=0"
    assert fgsm(0.1, draws=2).describe() == "fgsm eps=0.1, EoT 2"
    assert PGD("linf", 0.1, steps=1, random_start=True, step_size=0.1).describe() == "pgd-linf eps=0.1, 1 steps"
    assert PGD("l2", 0.1, steps=1, random_start=False, step_size=0.1).describe() == "pgd-l2 eps=0.1, 1 steps"
    assert PGD("linf", 0.1, steps=5, random_start=False, step_size=0.1).describe() == "pgd-linf eps=0.1, 5 steps"
    assert PGD("linf", 0.1, steps=1, random_start=False, step_size=0.05).describe() == "pgd-linf eps=0.1, 1 steps"
    assert PGD("linf", 0.2, draws=2).describe() == "pgd-linf eps=0.2, 10 steps, EoT 2"
    assert build_perturbation("adversarial").support_attack == fgsm(0.1)  # the paper's Omniglot size by default


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_steps_have_their_size_and_follow_the_gradient_where_they_stand(norm):
    """A concave loss -|x - c|^2 whose maximum c lies inside the ball (0.3 epsilon from x per pixel):
    PGD without a random start walks to c and then oscillates around it within one step, 2.5 epsilon
    / steps by default or the given step size; the gradient is taken at x + delta (taken at x - delta
    the walk runs away). Kills the step-size and gradient-point mutants that survived mutmut, which
    a linear loss (constant gradient, optimum on the sphere) cannot see."""
    x = torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64)
    eps = 0.2
    c = x + 0.3 * eps / (1.0 if norm == "linf" else 4.0)  # L2: 16 pixels, |c - x|_2 = 0.3 eps

    def loss_of(images):
        return -((images - c) ** 2).sum()

    def distance(a):
        d = (a - c).flatten(1)
        return (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max().item()

    for steps, step_size in ((10, None), (10, 0.01), (4, None)):
        adversarial = PGD(norm, eps, steps=steps, step_size=step_size, random_start=False)(loss_of, x)
        size = step_size if step_size is not None else 2.5 * eps / steps
        assert distance(adversarial) <= size + 1e-12, (steps, step_size, distance(adversarial), size)


def test_pgd_starts_at_random_and_only_ever_queries_valid_images():
    """With a loss that has no gradient PGD stays at its random start: a point of the L-inf box
    (not of another ball), different per example; every image the loss is evaluated on, the random
    start included, lies in [0, 1]; epsilon 0 returns x and a large epsilon attacks. Kills the
    random-start and pixel-range mutants that survived mutmut."""
    x = 0.2 + 0.6 * torch.rand(200, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0  # pixels at the ends of the range
    seen = []

    def flat_loss(images):
        seen.append(images.detach().clone())
        return (images * 0).sum()

    torch.manual_seed(0)
    start = PGD("linf", 0.1, steps=2)(flat_loss, x) - x
    assert all(s.min() >= 0 and s.max() <= 1 for s in seen) and len(seen) == 2
    inside = start[:, :, 2:].abs()  # the pixels away from the range's ends: uniform in [0, 0.1] in size
    assert inside.max() <= 0.1 and abs(inside.mean().item() - 0.05) < 5 * 0.1 / math.sqrt(12 * inside.numel())
    assert not torch.equal(start[0], start[1])
    assert torch.equal(PGD("linf", 0.0)(flat_loss, x), x)
    _net, images, _y, loss_of = tiny_classifier()
    assert loss_of(PGD("linf", 1.0, steps=3)(loss_of, images)) > loss_of(images) + 0.1


def test_steepest_ascent_directions_have_unit_norm_and_l1_moves_the_top_one_percent():
    """The step directions: sign(g) (L-inf), g / |g|_2 (L2: unit L2 norm), and for L1 the signs of
    the gradient's largest 1% coordinates (8 of 784 on a 28 x 28 image) over their count (unit L1
    norm; one coordinate on 16 pixels). Kills the direction mutants that survived mutmut."""
    from metareg.perturb.adversarial import steepest_ascent

    g = torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(steepest_ascent(g, "linf"), g.sign())
    torch.testing.assert_close(steepest_ascent(g, "l2").flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    d = steepest_ascent(g, "l1").flatten(1)
    top = g.flatten(1).abs().topk(8, dim=1).indices
    assert ((d != 0).sum(1) == 8).all() and torch.equal(d.gather(1, top), g.flatten(1).gather(1, top).sign() / 8)
    small = steepest_ascent(g[:, :, :4, :4], "l1").flatten(1)
    assert ((small != 0).sum(1) == 1).all() and torch.equal(small.abs().sum(1), torch.ones(3, dtype=torch.float64))


def test_projections_leave_points_of_the_ball_alone_and_attacks_check_their_settings():
    """``project`` is the identity inside each ball; PGD refuses a bad norm, negative epsilon, no
    steps, no draws or a non-positive step size, each alone, in one line that says what it needs.
    Kills the projection and validation mutants that survived mutmut."""
    from metareg.errors import ConfigError
    from metareg.perturb.adversarial import project

    inside = torch.full((2, 1, 4, 4), 0.01, dtype=torch.float64)  # L-inf 0.01, L2 0.04, L1 0.16
    for norm in ("linf", "l2", "l1"):
        assert torch.equal(project(inside, norm, 0.5), inside), norm
    with pytest.raises(ConfigError, match="attack norm must be linf, l2 or l1, got 'l3'"):
        PGD("l3")
    for bad in ({"epsilon": -0.1}, {"steps": 0}, {"draws": 0}, {"step_size": 0.0}, {"step_size": -1.0}):
        with pytest.raises(ConfigError, match="attack needs epsilon >= 0, steps >= 1, draws >= 1 and a positive step"):
            PGD("linf", **({"epsilon": 0.1} | bad))


def test_the_l1_projection_is_the_closest_point_of_the_ball():
    torch.manual_seed(0)
    v = torch.randn(5, 12, dtype=torch.float64) * 2
    w = project_l1(v, 1.5)
    torch.testing.assert_close(w.abs().sum(1), torch.full((5,), 1.5, dtype=torch.float64))
    for _ in range(200):  # no random point of the ball is closer
        u = project_l1(torch.randn(5, 12, dtype=torch.float64), 1.5) * torch.rand(5, 1, dtype=torch.float64)
        assert ((v - w).norm(dim=1) <= (v - u).norm(dim=1) + 1e-12).all()
    inside = torch.full((1, 4), 0.1, dtype=torch.float64)
    assert torch.equal(project_l1(inside, 1.0), inside)


# ------------------------------------------------------------------------------------ calibration
def test_ece_of_a_calibrated_predictor_is_near_zero_and_of_an_overconfident_one_is_its_gap():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)  # binary: top probability in [0.5, 1]
    correct = torch.rand(n, generator=g, dtype=torch.float64) < confidence
    probabilities = torch.stack([confidence, 1 - confidence], 1)
    labels = torch.where(correct, 0, 1)
    assert expected_calibration_error(probabilities, labels) < 0.01
    # Always 90% sure, right 60% of the time: ECE = |0.9 - 0.6| = 0.3, all in one bin.
    probabilities = torch.tensor([[0.9, 0.1]], dtype=torch.float64).expand(1000, 2)
    labels = torch.cat([torch.zeros(600, dtype=torch.long), torch.ones(400, dtype=torch.long)])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.3)
    bins = reliability(probabilities, labels)
    assert sum(bins["count"]) == 1000 and max(bins["count"]) == 1000


def test_ece_sums_the_gaps_of_bins_miscalibrated_in_opposite_directions():
    """Half the predictions 90% sure and right half the time (gap +0.4), half 55% sure and right 95%
    of the time (gap -0.4): over all predictions confidence and accuracy agree (0.725), but ECE,
    a per-bin sum, is 0.4. Catches a binning that puts everything in one bin (checked: ECE 0), and
    signed gaps that cancel."""
    n = 1000
    confidence = torch.cat([torch.full((n,), 0.9), torch.full((n,), 0.55)]).double()
    probabilities = torch.stack([confidence, 1 - confidence], 1)
    correct = torch.cat([torch.arange(n) < n // 2, torch.arange(n) < 95 * n // 100])
    labels = torch.where(correct, 0, 1)
    assert confidence.mean().item() == pytest.approx(correct.double().mean().item())  # no overall gap
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)
    bins = reliability(probabilities, labels)
    used = [i for i, c in enumerate(bins["count"]) if c]
    assert used == [8, 13] and [bins["count"][i] for i in used] == [n, n]  # [0.533, 0.6) and [0.867, 0.933)
    assert [bins["accuracy"][i] for i in used] == pytest.approx([0.95, 0.5])
    assert [bins["confidence"][i] for i in used] == pytest.approx([0.55, 0.9])


def test_calibration_bins_edge_cases_found_by_mutation_testing():
    """Confidence 1.0 falls in the last bin (and 14/15 <= c < 1 too), a confidence below 1/15 in the
    first (20-way uniform predictions), a bin holding a single prediction counts, float32 and
    batched ``[..., K]`` probabilities give the float64 flat totals, and ``bins`` is honoured. Each
    assertion kills a mutant that survived mutmut (evaluate/calibration.py)."""
    from metareg.evaluate.calibration import bin_totals

    sure = torch.tensor([[1.0, 0.0], [0.95, 0.05]], dtype=torch.float64)
    assert reliability(sure, torch.tensor([0, 1]))["count"][14] == 2
    uniform = torch.full((4, 20), 0.05, dtype=torch.float64)
    assert reliability(uniform, torch.zeros(4, dtype=torch.long))["count"][0] == 4
    one = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    assert expected_calibration_error(one, torch.tensor([1])) == pytest.approx(0.9)  # one wrong prediction
    g = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(2, 6, 5, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    flat = bin_totals(probabilities.view(12, 5), labels.view(12))
    assert torch.equal(bin_totals(probabilities, labels), flat)  # [episodes, query, K] as the meta-test passes
    torch.testing.assert_close(bin_totals(probabilities.float(), labels), flat, rtol=1e-6, atol=1e-6)
    assert len(reliability(probabilities.view(12, 5), labels.view(12), bins=10)["count"]) == 10
    coarse = torch.tensor([[0.4, 0.3, 0.3], [0.95, 0.05, 0.0]], dtype=torch.float64)  # right at 0.4, wrong at 0.95
    assert expected_calibration_error(coarse, torch.tensor([0, 1]), bins=1) == pytest.approx(abs(0.675 - 0.5))
    assert expected_calibration_error(coarse, torch.tensor([0, 1]), bins=2) == pytest.approx(0.6 / 2 + 0.95 / 2)


# ------------------------------------------------------------------------- transfer and reports
@pytest.mark.slow
@pytest.mark.parametrize("name", ["information-dropout", "dropblock", "manifold-mixup", "mixup", "vib"])
def test_transfer_baselines_train_and_test_in_any_backbone(tmp_path, name):
    from metareg.runs.transfer import transfer

    config = tiny_transfer(f"perturb.name={name}", "perturb.mc_samples=3")
    record = transfer(config, tmp_path / name, progress=False)
    # Feature noise before a running-statistics batch norm is averaged over samples at test (as
    # MetaPerturb); mixing and block dropout test noise-free.
    samples = 3 if name in ("information-dropout", "vib") else 1
    assert 0 <= record["mean"] <= 1 and record["perturbation"] == name and record["protocol"]["mc_samples"] == samples
    assert math.isfinite(record["nll"]) and 0 <= record["ece"] <= 1
    assert_scores_and_calibration_follow_from_the_predictions(tmp_path / name, record)


def hand_ece(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Naeini et al.'s ECE written out: 15 equal confidence bins, sum_b n_b / n |accuracy_b - confidence_b|."""
    confidence, predicted = probabilities.max(1)
    total = 0.0
    for b in range(bins):
        inside = (confidence >= b / bins) & ((confidence < (b + 1) / bins) if b < bins - 1 else (confidence <= 1))
        if inside.any():
            gap = confidence[inside].mean() - (predicted[inside] == labels[inside]).double().mean()
            total += inside.sum().item() / len(labels) * gap.abs().item()
    return total


def assert_scores_and_calibration_follow_from_the_predictions(run, record) -> None:
    """A transfer run's test record recomputed from ``predict()``'s probabilities of its stored network
    (the same Monte-Carlo samples and seed): per-image correctness, NLL = mean -log p(true label), and
    ECE by hand. Catches the NLL of the top class instead of the true one (checked: the recorded NLL
    then differs), and correctness or ECE computed on other predictions."""
    from metareg.build import IMAGE_CHANNELS
    from metareg.fewshot import load_transfer_model
    from metareg.meta.ordinary import predict
    from metareg.nets.modes import set_training_progress
    from metareg.runs.transfer import samples_at_test, target_data
    from metareg.seeds import derive_seed

    config, model = load_transfer_model(run)
    set_training_progress(model, 1.0)
    _, test = target_data(config.data)
    probabilities = predict(
        model,
        test.images,
        samples=record["protocol"]["mc_samples"],
        channels=IMAGE_CHANNELS,
        device=torch.device("cpu"),
        dtype=torch.float32,
        seed=derive_seed(config.seed, 3),
        sample=samples_at_test(config),
    )
    correct = (probabilities.argmax(1) == test.labels).double()
    assert correct.tolist() == record["scores"]
    true_nll = -probabilities[torch.arange(len(test)), test.labels].log().mean().item()
    assert record["nll"] == pytest.approx(true_nll, rel=1e-9)
    assert record["ece"] == pytest.approx(hand_ece(probabilities, test.labels), abs=1e-12)


@pytest.mark.slow
def test_episodic_test_results_hold_calibration_and_the_reliability_plot_takes_them(tmp_path):
    """The meta-test's per-episode accuracy and NLL and its ECE recomputed from the query outputs the
    learner produced (recorded): NLL = mean -log p(true label) per episode, ECE by hand over every
    query prediction. Catches the NLL of the top class (checked) and calibration of other outputs."""
    from metareg.runs.episodic import meta_test, save_result, train
    from metareg.viz.reliability import plot_reliability

    config = tiny("train.steps=1")
    trainer = train(config, tmp_path / "run", progress=False)
    learner, seen = trainer.learner, []
    query_outputs = learner.query_outputs

    def recorded(batch, **kw):
        seen.append((query_outputs(batch, **kw).double(), batch.query_y))
        return seen[-1][0]

    learner.query_outputs = recorded
    result = meta_test(config, learner, episodes=5, progress=False)
    c = result.calibration
    assert len(c["episode_nll"]) == 5 and c["nll"] == pytest.approx(sum(c["episode_nll"]) / 5) and 0 <= c["ece"] <= 1
    outputs, labels = torch.cat([o for o, _ in seen]), torch.cat([y for _, y in seen])
    assert outputs.shape[:2] == (5, 6)
    nll = torch.stack([F.cross_entropy(o, y) for o, y in zip(outputs, labels)])
    torch.testing.assert_close(torch.tensor(c["episode_nll"], dtype=torch.float64), nll, rtol=1e-6, atol=0)
    accuracy = (outputs.argmax(-1) == labels).double().mean(1)
    torch.testing.assert_close(result.scores, accuracy, rtol=1e-6, atol=0)
    assert c["ece"] == pytest.approx(hand_ece(outputs.softmax(-1).flatten(0, 1), labels.flatten()), rel=1e-6)
    assert sum(c["reliability"]["count"]) == 5 * 6  # every query prediction: 3 classes x 2 queries per episode
    save_result(result, tmp_path / "run" / "test.json")
    assert plot_reliability([tmp_path / "run"], tmp_path / "r.png").stat().st_size > 5000


@pytest.mark.slow
def test_robust_accuracy_of_a_transfer_run_falls_with_epsilon_below_random_noise_and_is_cached(tmp_path):
    """A Base network that fits its 5 glyph classes (about 80% test accuracy): PGD in the L-inf and
    L2 balls lowers its accuracy far below what random noise of the same size does (a corner of the
    L-inf ball, a random direction of the L2 sphere); results are cached per attack. Catches a PGD
    that walks at random (checked: it scores like the noise, ~0.8, against ~0.3 and ~0.1)."""
    import json

    from metareg.build import IMAGE_CHANNELS
    from metareg.data.augment import to_channels
    from metareg.fewshot import load_transfer_model
    from metareg.meta.ordinary import predict
    from metareg.runs.robustness import robust_accuracy
    from metareg.runs.transfer import target_data, transfer

    fitting = ("data.classes=5", "data.options.num_classes=5", "train.steps=40", "train.lr=0.01", "train.augment=false")
    transfer(tiny_transfer("perturb.name=none", *fitting), tmp_path / "base", progress=False)
    clean = robust_accuracy(tmp_path / "base", "pgd-linf", 0.0, steps=3)
    attacked = robust_accuracy(tmp_path / "base", "pgd-linf", 0.2, steps=3)
    assert clean > 0.6 and attacked < clean
    cache = json.loads((tmp_path / "base" / "robustness.json").read_text())
    assert len(cache) == 2 and robust_accuracy(tmp_path / "base", "pgd-linf", 0.2, steps=3) == attacked

    config, model = load_transfer_model(tmp_path / "base")
    _, test = target_data(config.data)
    x = to_channels(test.images, IMAGE_CHANNELS).double() / 255
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for norm, epsilon, noise in (
        ("linf", 0.05, 0.05 * direction.sign()),
        ("l2", 1.0, direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)),
    ):
        probabilities = predict(
            model,
            (x + noise).clamp(0, 1),
            samples=1,
            channels=IMAGE_CHANNELS,
            device=torch.device("cpu"),
            dtype=torch.float32,
            seed=0,
            sample=False,
        )
        noisy = (probabilities.argmax(1) == test.labels).double().mean().item()
        pgd = robust_accuracy(tmp_path / "base", f"pgd-{norm}", epsilon, steps=5)
        assert pgd < noisy - 0.3, (norm, pgd, noisy)


@pytest.mark.slow
def test_attacks_on_the_command_line_and_the_robustness_plot(tmp_path, capsys):
    import json

    from metareg import cli
    from metareg.runs.episodic import train

    train(tiny("train.steps=1"), tmp_path / "run", progress=False)
    common = ["--no-progress", "test", "--checkpoint", str(tmp_path / "run"), "--episodes", "3"]
    assert (
        cli.main(
            [
                *common,
                "--attack",
                "pgd-l2",
                "--epsilon",
                "0.5",
                "--attack-steps",
                "2",
                "--out",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "attacked by pgd-l2 eps=0.5, 2 steps" in out and "calibration: NLL" in out
    assert json.loads((tmp_path / "a.json").read_text())["protocol"]["attack"] == "pgd-l2 eps=0.5, 2 steps"
    assert cli.main([*common, "--attack", "fgsm"]) == 2 and "needs --epsilon" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "--no-progress",
                "plot",
                "robustness",
                str(tmp_path / "run"),
                "--attack",
                "fgsm",
                "--epsilons",
                "0",
                "0.2",
                "--episodes",
                "3",
                "--out",
                str(tmp_path / "rob.png"),
            ]
        )
        == 0
    )
    assert "eps 0.2:" in capsys.readouterr().out and (tmp_path / "rob.png").stat().st_size > 5000


@pytest.mark.slow
def test_attacked_episodes_score_at_most_their_clean_scores_on_the_command_line(tmp_path, capsys):
    """`metareg test --attack` on the episodes of the clean `metareg test`: every attack lowers or
    keeps every episode's accuracy, lowers it somewhere, and raises the mean query NLL (the attacks'
    objective). Catches a learner or command that never applies the attack (checked: with
    ``query_outputs`` ignoring ``attack`` the attacked scores equal the clean ones)."""
    import json

    from metareg import cli
    from metareg.runs.episodic import train

    train(tiny("train.steps=4"), tmp_path / "run", progress=False)
    common = ["--no-progress", "test", "--checkpoint", str(tmp_path / "run"), "--episodes", "8"]
    assert cli.main([*common, "--out", str(tmp_path / "clean.json")]) == 0
    clean = json.loads((tmp_path / "clean.json").read_text())
    assert 0.4 < clean["mean"] < 1  # above chance (1/3), with room to fall
    for attack, epsilon in (("fgsm", "0.05"), ("pgd-linf", "0.05"), ("pgd-l2", "0.5"), ("pgd-l1", "2")):
        out = tmp_path / f"{attack}.json"
        args = ["--attack", attack, "--epsilon", epsilon, "--attack-steps", "3", "--out", str(out)]
        assert cli.main([*common, *args]) == 0
        attacked = json.loads(out.read_text())
        assert {k: v for k, v in attacked["protocol"].items() if k != "attack"} == clean["protocol"]
        pairs = list(zip(attacked["scores"], clean["scores"], strict=True))
        assert all(a <= c for a, c in pairs), (attack, pairs)
        assert any(a < c for a, c in pairs), attack
        assert attacked["nll"] > clean["nll"], attack
    capsys.readouterr()


def test_auto_strategy_keeps_the_loop_for_what_vmap_cannot_batch():
    from metareg.build import resolve_strategy

    cuda = torch.device("cuda")
    assert resolve_strategy("auto", cuda, "conv4") == "vmap"
    for name in ("mixup", "manifold-mixup", "adversarial"):
        assert resolve_strategy("auto", cuda, "conv4", getattr(build_perturbation(name), "vmap_safe", True)) == "loop"
    assert resolve_strategy("vmap", cuda, "conv4", False) == "vmap"  # asked for explicitly
