"""The regularizers the seeds compare against (Mixup, Manifold Mixup, VIB, Information Dropout,
Meta-Dropout's KL rows, inner-loop adversarial training, DropBlock), the attacks (FGSM, PGD in
three norms, EoT) and calibration: laws, closed forms, meta-gradients, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import learner_for, random_image_batch
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


# ------------------------------------------------------------------------- transfer and reports
def tiny_transfer(*extra: str):
    from metareg.config import TransferConfig, parse_assignment
    from metareg.runs.common import resolve
    from test_perturb_runs import TINY_TRANSFER

    return resolve(
        "transfer-quickstart", overrides=[parse_assignment(s) for s in (*TINY_TRANSFER, *extra)], schema=TransferConfig
    )


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


def test_transfer_chooses_its_hyperparameters_on_a_held_out_validation_split(tmp_path):
    import json

    from metareg import cli
    from metareg.data.labeled import hold_out
    from metareg.runs.transfer import SELECTION_GRIDS, VALIDATION_FRACTION, target_data

    out = tmp_path / "run"
    config = tiny_transfer("perturb.name=information-dropout", "select=true")
    from metareg.runs.transfer import transfer

    record = transfer(config, out, progress=False)
    selection = json.loads((out / "selection.json").read_text())
    grid = SELECTION_GRIDS["information-dropout"]["beta"]
    assert [c["options"]["beta"] for c in selection["candidates"]] == grid
    best = max(selection["candidates"], key=lambda c: c["validation_accuracy"])
    assert selection["chosen"] == best["options"] == {"beta": record["perturbation_options"]["beta"]}
    train, _ = target_data(config.data)
    rest, validation = hold_out(train, VALIDATION_FRACTION, config.data.seed)
    assert selection["validation_images"] == len(validation) and len(rest) + len(validation) == len(train)
    trial = json.loads((out / "selection" / "0" / "test.json").read_text())
    assert trial["protocol"]["test_images"] == len(validation) and trial["train_images"] == len(rest)
    assert record["train_images"] == len(train)  # the final run trains on every training image
    # Started runs are continued, not overwritten.
    assert cli.main(["--no-progress", "perturb", "transfer", "--out", str(out), "--preset", "transfer-quickstart"]) == 2


def test_episodic_test_results_hold_calibration_and_the_reliability_plot_takes_them(tmp_path):
    from metareg.runs.episodic import meta_test, save_result, train
    from metareg.viz.reliability import plot_reliability
    from test_training import tiny

    config = tiny("train.steps=1")
    trainer = train(config, tmp_path / "run", progress=False)
    result = meta_test(config, trainer.learner, episodes=5, progress=False)
    c = result.calibration
    assert len(c["episode_nll"]) == 5 and c["nll"] == pytest.approx(sum(c["episode_nll"]) / 5) and 0 <= c["ece"] <= 1
    assert sum(c["reliability"]["count"]) == 5 * 6  # every query prediction: 3 classes x 2 queries per episode
    save_result(result, tmp_path / "run" / "test.json")
    assert plot_reliability([tmp_path / "run"], tmp_path / "r.png").stat().st_size > 5000


def test_robust_accuracy_of_a_transfer_run_falls_with_epsilon_and_is_cached(tmp_path):
    import json

    from metareg.runs.robustness import robust_accuracy
    from metareg.runs.transfer import transfer

    transfer(tiny_transfer("perturb.name=none", "train.steps=30"), tmp_path / "base", progress=False)
    clean = robust_accuracy(tmp_path / "base", "pgd-linf", 0.0, steps=3)
    attacked = robust_accuracy(tmp_path / "base", "pgd-linf", 0.2, steps=3)
    assert attacked < clean
    cache = json.loads((tmp_path / "base" / "robustness.json").read_text())
    assert len(cache) == 2 and robust_accuracy(tmp_path / "base", "pgd-linf", 0.2, steps=3) == attacked


def test_attacks_on_the_command_line_and_the_robustness_plot(tmp_path, capsys):
    import json

    from metareg import cli
    from metareg.runs.episodic import train
    from test_training import tiny

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


def test_auto_strategy_keeps_the_loop_for_what_vmap_cannot_batch():
    from metareg.build import resolve_strategy

    cuda = torch.device("cuda")
    assert resolve_strategy("auto", cuda, "conv4") == "vmap"
    for name in ("mixup", "manifold-mixup", "adversarial"):
        assert resolve_strategy("auto", cuda, "conv4", getattr(build_perturbation(name), "vmap_safe", True)) == "loop"
    assert resolve_strategy("vmap", cuda, "conv4", False) == "vmap"  # asked for explicitly
