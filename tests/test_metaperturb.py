"""MetaPerturb: the 82-parameter perturbation, attaching it to any CNN, the joint meta-training
(Eq. 3 and Algorithm 1: stop-gradients, loop = vmap, exact resume) and the backbones it transfers to."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metareg.errors import CheckpointError, ConfigError
from metareg.meta.joint import JointLearner
from metareg.nets import create_model
from metareg.perturb import (
    MetaPerturb,
    MetaPerturbFunction,
    attach_metaperturb,
    metaperturb_slots,
    set_strength,
)
from metareg.perturb.pretrained import load_phi, phi_info, save_phi


def phi_with(std: float = 0.3, seed: int = 0, **kw) -> MetaPerturbFunction:
    """A phi whose parameters are large enough to make every term matter."""
    torch.manual_seed(seed)
    phi = MetaPerturbFunction(**kw)
    for p in phi.parameters():
        nn.init.normal_(p, std=std)
    return phi.double()


def slot(phi: MetaPerturbFunction, channels: int = 6) -> MetaPerturb:
    return MetaPerturb(phi, channels, channel_norm=8, spatial_norm=16).double()


# --------------------------------------------------------------------------- the function phi
def test_phi_has_the_papers_82_parameters():
    phi = MetaPerturbFunction()
    shapes = {n: tuple(p.shape) for n, p in phi.named_parameters()}
    assert sum(p.numel() for p in phi.parameters()) == 82
    assert shapes == {
        "stat_kernels": (4, 1, 3, 3),
        "noise1.self_kernel": (1, 1, 3, 3),
        "noise1.all_kernel": (1, 1, 3, 3),
        "noise2.self_kernel": (1, 1, 3, 3),
        "noise2.all_kernel": (1, 1, 3, 3),
        "scale_map.weight": (1, 10),
    }
    # Reference init: every parameter normal with std 0.01.
    values = torch.cat([p.flatten() for p in MetaPerturbFunction().parameters()])
    assert values.abs().max() < 0.06 and 0.004 < values.std() < 0.02


def test_equivariant_op_matches_its_definition():
    """out_c = lambda * h_c + gamma * mean_c' h_c' (3x3 'same' convolutions)."""
    phi = phi_with()
    op = phi.noise1
    h = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    lam, gam = op.self_kernel[0, 0], op.all_kernel[0, 0]
    padded, mean = F.pad(h, (1, 1, 1, 1)), F.pad(h.mean(1), (1, 1, 1, 1))
    expected = torch.zeros_like(h)
    for i in range(3):
        for j in range(3):
            expected += lam[i, j] * padded[:, :, i : i + 7, j : j + 7] + gam[i, j] * mean[:, None, i : i + 7, j : j + 7]
    torch.testing.assert_close(op(h), expected)


def test_noise_generator_and_perturbation_are_channel_permutation_equivariant():
    phi = phi_with()
    layer = slot(phi, channels=6).train()
    h = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(phi.noise_mean(h[:, perm]), phi.noise_mean(h)[:, perm])
    torch.testing.assert_close(layer.scales(h[:, perm]), layer.scales(h)[perm])
    torch.testing.assert_close(layer(h[:, perm]), layer(h)[:, perm])
    # ... and not merely symmetric: different channels get different perturbations.
    assert layer.scales(h).std() > 1e-4


def _softplus_normal_moments(mu: torch.Tensor, order: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """E and Var of Softplus(a), a ~ N(mu, 1), by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite.hermgauss(order)
    x, w = torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64) / math.sqrt(math.pi)
    values = F.softplus(mu[..., None] + math.sqrt(2) * x)
    mean = (values * w).sum(-1)
    return mean, (values**2 * w).sum(-1) - mean**2


def test_noise_follows_softplus_of_a_unit_variance_normal_around_mu():
    """Eq. 1: z = Softplus(a), a ~ N(mu_phi(h), I), checked against quadrature moments."""
    phi = phi_with(std=0.5)
    h = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    n = 20000
    z = phi.noise(h.expand(n, -1, -1, -1), sample=True)
    mean, var = _softplus_normal_moments(phi.noise_mean(h)[0].detach())
    assert float(phi.noise_mean(h).detach().std()) > 0.2  # a spread of means, so the check covers several mu
    se_mean = (var / n).sqrt()
    assert ((z.mean(0) - mean).abs() < 5 * se_mean).all()
    assert ((z.var(0) - var).abs() < 0.06 * var + 0.01).all()
    torch.testing.assert_close(phi.noise(h, sample=False), F.softplus(phi.noise_mean(h)))


def test_strength_anneals_from_identity_to_eq2_and_clip_bounds_from_above():
    phi = phi_with(clip=None)
    layer = slot(phi).train()
    h = torch.randn(4, 6, 8, 8, dtype=torch.float64) * 3
    set_strength(phi, 0.0)
    torch.testing.assert_close(layer(h), h)
    set_strength(phi, 1.0)
    g = layer.scales(h).view(1, -1, 1, 1) * phi.noise(h, sample=False)
    torch.testing.assert_close(layer(h), h * g)
    set_strength(phi, 0.25)
    torch.testing.assert_close(layer(h), h * ((g - 1) * 0.25 + 1))
    phi.clip = 0.5
    clipped = layer(h).detach()
    assert float(clipped.max()) <= 0.5 and float(clipped.min()) < -0.5
    with pytest.raises(ConfigError):
        set_strength(phi, 1.5)


def test_the_strength_schedule_is_linear_over_the_annealed_fraction_of_training():
    """MetaPerturb's strength c = min(1, t / anneal) (the released code's linear warm-up over the
    first ``anneal`` of training), full strength without annealing. Kills the schedule mutants that
    survived mutmut (perturb/metaperturb.py)."""
    for anneal, fractions, strengths in (
        (0.4, (0.0, 0.1, 0.2, 0.4, 0.9), (0.0, 0.25, 0.5, 1.0, 1.0)),
        (2.0, (0.5, 1.0), (0.25, 0.5)),  # annealing longer than training never reaches 1
        (0.0, (0.0, 0.5), (1.0, 1.0)),
    ):
        phi = phi_with(anneal=anneal)
        for fraction, strength in zip(fractions, strengths):
            phi.set_training_progress(fraction)
            assert phi.strength == pytest.approx(strength), (anneal, fraction)


def test_metaperturb_slots_come_from_conv_layers_with_their_index_and_size_and_sample_at_test():
    """The slot factory: one MetaPerturb per hidden conv layer carrying the layer's index and map
    size, the identity at the output, a clear refusal for a dense layer or a layer whose network
    normalizers are unknown, predictions averaged over noise at test time; the slot refuses
    non-positive channels or normalizers by name (1 is fine). Kills the slot mutants that survived
    mutmut (perturb/metaperturb.py)."""
    from metareg.nets import LayerInfo
    from metareg.nets.slots import FeaturePerturbation
    from metareg.perturb import build_perturbation, metaperturb_slots

    factory = metaperturb_slots(phi_with())
    assert factory.sample_at_test is True and build_perturbation("metaperturb").sample_at_test is True
    conv = LayerInfo(2, "conv", 4, 6, kernel_size=3, padding=1, size=7, network_width=8, input_size=28)
    made = factory(conv)
    assert (made.index, made.height, made.channels, made.channel_norm, made.spatial_norm) == (2, 7, 6, 8.0, 28.0)
    assert MetaPerturb(phi_with(), 6, channel_norm=8, spatial_norm=16).index == 0
    assert type(factory(LayerInfo(3, "dense", 6, 5, output=True, network_width=8, input_size=28))) is (
        FeaturePerturbation
    )
    for bad in (
        LayerInfo(3, "dense", 6, 5, network_width=8, input_size=28),
        LayerInfo(0, "conv", 4, 6, kernel_size=3, padding=1, size=7, input_size=28),
        LayerInfo(0, "conv", 4, 6, kernel_size=3, padding=1, size=7, network_width=8),
    ):
        with pytest.raises(ConfigError, match="MetaPerturb perturbs convolutional feature maps"):
            factory(bad)
    MetaPerturb(phi_with(), 1, channel_norm=1, spatial_norm=1)  # the smallest that make sense
    for channels, channel_norm, spatial_norm in ((0, 8, 16), (6, 0, 16), (6, 8, 0)):
        with pytest.raises(ConfigError, match="MetaPerturb needs positive channels and normalizers, got "):
            MetaPerturb(phi_with(), channels, channel_norm=channel_norm, spatial_norm=spatial_norm)


def test_scale_uses_batch_statistics_in_training_and_running_averages_in_eval():
    phi = phi_with()
    layer = slot(phi).train()
    h = torch.randn(8, 6, 8, 8, dtype=torch.float64)
    features = phi.channel_features(h)
    layer(h)
    torch.testing.assert_close(layer.running_mean, 0.1 * features.mean(0))  # momentum 0.1 from 0
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * features.var(0))  # from 1, unbiased
    # Eval: s comes from the running statistics, so an image's output does not depend on its batch.
    layer.eval()
    before = layer.running_mean.clone()
    alone, in_batch = layer(h[:1]), layer(torch.cat([h[:1], 5 * h[1:]]))[:1]
    torch.testing.assert_close(alone, in_batch)
    torch.testing.assert_close(layer.running_mean, before)
    # Training: the batch matters.
    layer.train()
    assert not torch.allclose(layer(torch.cat([h[:2], 5 * h[2:]]))[:2], layer(h[:2]))


def test_slot_statistics_diagnostics_and_refusals():
    """Running averages move by momentum 0.1 from where they are (two updates: 0.09 m1 + 0.1 m2),
    s normalizes by the feature map's height (not its width: a 6 x 8 map), the slot records its
    mean z and s for the trainers' logs, and refuses features of another shape, one image per
    batch (or per stacked copy) in training, and stacked copies with running statistics, each in
    one line. Kills the slot mutants that survived mutmut (perturb/metaperturb.py)."""
    from metareg.nets.layers import stacked_copies
    from metareg.nets.slots import recording

    phi = phi_with()
    layer = MetaPerturb(phi, 6, channel_norm=8, spatial_norm=16, index=3).double().train()
    g = torch.Generator().manual_seed(0)
    h1, h2 = (torch.randn(8, 6, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    layer(h1)
    layer(h2)
    m1, m2 = phi.channel_features(h1).mean(0), phi.channel_features(h2).mean(0)
    torch.testing.assert_close(layer.running_mean, 0.9 * 0.1 * m1 + 0.1 * m2)
    features = phi.channel_features(h2)
    expected = phi.scale(features.mean(0), features.var(0), 6 / 8, 6 / 16)  # H = 6
    torch.testing.assert_close(layer.scales(h2), expected)
    with recording() as record:
        out = layer(h2, sample=False)
    z = phi.noise(h2, sample=False)
    torch.testing.assert_close(record.metrics["z3"], z.mean())
    torch.testing.assert_close(record.metrics["s3"], layer.scales(h2).mean())
    assert out.shape == h2.shape
    with pytest.raises(ConfigError, match=re.escape("MetaPerturb at a 6-channel layer got features of shape (4, 6)")):
        layer(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ConfigError, match=re.escape("got features of shape (4, 5, 6, 6)")):
        layer(torch.randn(4, 5, 6, 6, dtype=torch.float64))
    with pytest.raises(
        ConfigError, match="MetaPerturb's batch statistics need at least 2 images per batch in training"
    ):
        layer(h1[:1])
    episodic = MetaPerturb(phi, 6, channel_norm=8, spatial_norm=16, running_stats=False).double()
    with stacked_copies(2):
        with pytest.raises(ConfigError, match="need at least 2 images per batch"):
            episodic(h1[:2])  # one image per copy
        with pytest.raises(ConfigError, match="stacked copies of a batch are for episodic networks, whose MetaPerturb"):
            layer(h1)


# ------------------------------------------------------------------------- attaching to a CNN
def user_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double()


def test_attaching_to_a_user_model_changes_nothing_at_strength_zero():
    x = torch.randn(6, 3, 12, 12, dtype=torch.float64)
    bare = user_cnn()
    expected = bare(x)
    phi = phi_with(clip=None)
    model = attach_metaperturb(user_cnn(), phi, at=["1", "5"], input_shape=(3, 12, 12))
    set_strength(phi, 0.0)
    torch.testing.assert_close(model(x), expected)
    set_strength(phi, 1.0)
    assert not torch.allclose(model(x), expected)
    assert model.points == ["1", "5"] and [s.channels for s in model.slots] == [8, 16]
    assert model.slots[0].channel_norm == 16 and model.slots[0].spatial_norm == 12  # widest layer, input size
    # detach() gives back the model without hooks (train mode: batch statistics, as above).
    torch.testing.assert_close(model.detach()(x), expected)


def test_attached_slots_save_load_and_move_with_the_model():
    phi = phi_with()
    model = attach_metaperturb(user_cnn(), phi, at=["1", "5"], input_shape=(3, 12, 12))
    model(torch.randn(4, 3, 12, 12, dtype=torch.float64))  # moves the running statistics
    state = model.state_dict()
    assert {"slots.0.running_mean", "slots.1.running_var", "perturbation_function.scale_map.weight"} <= set(state)
    assert sum(v.numel() for k, v in state.items() if k.startswith("perturbation_function.")) == 82
    other = attach_metaperturb(user_cnn(), MetaPerturbFunction().double(), at=["1", "5"], input_shape=(3, 12, 12))
    other.load_state_dict(state)
    torch.testing.assert_close(other.slots[1].running_mean, model.slots[1].running_mean)
    other.float()
    assert (
        other.slots[0].running_var.dtype == torch.float32
        and other.perturbation_function.scale_map.weight.dtype == torch.float32
    )
    assert other(torch.randn(2, 3, 12, 12)).dtype == torch.float32


def test_attach_errors_are_clear():
    with pytest.raises(ConfigError, match="matches no module"):
        attach_metaperturb(user_cnn(), phi_with(), at=["nope"], input_shape=(3, 12, 12))
    with pytest.raises(ConfigError, match="feature maps"):
        attach_metaperturb(user_cnn(), phi_with(), at=["8"], input_shape=(3, 12, 12))  # Flatten's output
    with pytest.raises(ConfigError, match="perturbation points"):
        attach_metaperturb(user_cnn(), phi_with(), input_shape=(3, 12, 12))
    model = attach_metaperturb(user_cnn(), phi_with(), at=["1"], input_shape=(3, 12, 12))
    with pytest.raises(ConfigError, match="already"):
        attach_metaperturb(model, phi_with(), at=["model.1"], input_shape=(3, 12, 12))
    with pytest.raises(ConfigError, match="at least 2 images"):
        model.train()(torch.randn(1, 3, 12, 12, dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "params", "points"),
    [
        # Conv4-64 at 32x32: 1792 + 3 * 36928 (convs) + 512 (batch norm) + 2570 (2x2x64 -> 10).
        ("conv4", 115_658, 4),
        ("conv6", 189_770, 6),
        ("vgg9", 9_231_114, 8),
        # He et al.'s CIFAR ResNets with option-A shortcuts: 0.27M, 0.46M, 0.66M, 0.85M.
        ("resnet20", 269_722, 9),
        ("resnet32", 464_154, 15),
        ("resnet44", 658_586, 21),
        ("resnet56", 853_018, 27),
        # torchvision's ResNet18 (11,689,512 with 1000 classes) with a 10-class head; WRN-28-2: 1.47M.
        ("resnet18", 11_181_642, 8),
        ("wrn-28-2", 1_467_610, 12),
    ],
)
def test_every_backbone_takes_metaperturb_at_each_block_output(name, params, points):
    """Parameter counts of 10-class backbones on 32x32 RGB images, against published counts; the
    same perturbation in the backbone's slots and attached by hooks gives the same outputs."""
    options = {"channels": 64} if name in ("conv4", "conv6") else {}
    torch.manual_seed(0)
    net = create_model(name, 10, in_channels=3, image_size=32, standard=True, **options)
    assert sum(p.numel() for p in net.parameters()) == params
    phi = MetaPerturbFunction()
    model = attach_metaperturb(net, phi, input_shape=(3, 32, 32))
    assert len(model.slots) == points
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = model.train()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.manual_seed(0)
    slotted = create_model(
        name, 10, in_channels=3, image_size=32, standard=True, perturbation=metaperturb_slots(phi), **options
    )
    assert sum(isinstance(m, MetaPerturb) for m in slotted.modules()) == points
    assert sum(p.numel() for p in slotted.parameters()) == params + 82  # phi, owned once by the network
    torch.manual_seed(1)
    torch.testing.assert_close(slotted.train()(x, sample=True), out)


# ---------------------------------------------------------------------------- joint training
def tiny_learner(
    strategy: str, tasks=(0, 1, 2), classes=(3, 2, 3), seed: int = 0, sample: bool = False, same_networks: bool = False
) -> JointLearner:
    """sample=False: deterministic noise, so the strategies and the reference see the same numbers."""
    phi = phi_with(seed=seed).float()  # the networks are built in float32, then the learner moves to float64
    factory = metaperturb_slots(phi)

    def build(t):
        torch.manual_seed(100 if same_networks else 100 + t)
        return create_model(
            "resnet20", max(classes), in_channels=3, image_size=8, blocks=(1, 1, 1), standard=True, perturbation=factory
        )

    return JointLearner(
        build,
        list(tasks),
        3,
        input_shape=(3, 8, 8),
        strategy=strategy,
        classes=[classes[t] for t in tasks],
        sample=sample,
    ).double()


def tiny_batch(seed: int, tasks: int = 3, classes=(3, 2, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 6, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.stack([torch.randint(0, classes[t], (6,), generator=g) for t in range(tasks)])
    return x, y


def test_joint_gradients_follow_eq3_stop_gradients():
    """theta_t's gradient is d L_tr,t / d theta_t and phi's is d (1/T) sum_t L_te,t / d phi, computed
    here with plain autograd on the same networks: phi gets nothing from the train losses, theta
    nothing from the test losses; absent classes are masked."""
    learner = tiny_learner("loop")
    reference = tiny_learner("loop")
    x_tr, y_tr = tiny_batch(1)
    x_te, y_te = tiny_batch(2)
    learner.theta_backward(x_tr, y_tr, seed=0, step=0)
    assert all(p.grad is None for p in learner.phi_parameters())
    theta_grads = [p.grad.clone() for p in learner.theta_parameters()]
    learner.phi_backward(x_te, y_te, seed=0, step=0)
    for before, p in zip(theta_grads, learner.theta_parameters()):
        torch.testing.assert_close(p.grad, before)  # the test pass left theta alone

    phi_expected = [torch.zeros_like(p) for p in reference.phi_parameters()]
    for i, net in enumerate(reference.networks):
        classes = (3, 2, 3)[i]
        loss = F.cross_entropy(net(x_tr[i])[:, :classes], y_tr[i])
        expected = torch.autograd.grad(loss, [p for _, p in reference.task_parameters(net)], allow_unused=True)
        got = [p.grad for _, p in learner.task_parameters(learner.networks[i])]
        assert len(got) == len(expected) > 0
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e)
    for i, net in enumerate(reference.networks):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        loss = F.cross_entropy(net(x_te[i])[:, : (3, 2, 3)[i]], y_te[i]) / 3
        for acc, g in zip(phi_expected, torch.autograd.grad(loss, reference.phi_parameters())):
            acc += g
    for e, p in zip(phi_expected, learner.phi_parameters()):
        torch.testing.assert_close(p.grad, e)
    assert all(float(p.grad.abs().max()) > 0 for p in learner.phi_parameters())


def test_loop_and_vmap_give_the_same_numbers():
    results = {}
    for strategy in ("loop", "vmap"):
        learner = tiny_learner(strategy)
        m_tr = learner.theta_backward(*tiny_batch(1), seed=0, step=0)
        m_te = learner.phi_backward(*tiny_batch(2), seed=0, step=0)
        results[strategy] = (
            [p.grad for p in learner.theta_parameters()],
            [p.grad for p in learner.phi_parameters()],
            [m_tr["loss"], m_te["loss"], m_tr["accuracy"]],
            list(learner.buffers()),
        )
    for a, b in zip(results["loop"], results["vmap"]):
        for u, v in zip(a, b):
            torch.testing.assert_close(u.double(), v.double())


def test_vmap_draws_different_noise_for_each_task():
    """The library's vmap path gives every task its own noise: three identical networks on identical
    batches get three different losses in both passes (theta's and phi's) when the noise is sampled,
    and the same loss when it is not (so the difference is the noise's)."""

    def identical_tasks(sample: bool) -> JointLearner:
        return tiny_learner(
            "vmap", classes=(3, 3, 3), sample=sample, same_networks=True
        )  # the same network for every task

    x, y = tiny_batch(1)
    x, y = (
        x[:1].expand(3, -1, -1, -1, -1).contiguous(),
        y[:1].expand(3, -1).contiguous(),
    )  # the same batch for every task
    for sample in (True, False):
        learner = identical_tasks(sample)
        for losses in (
            learner.theta_backward(x, y, seed=0, step=0)["loss"],
            learner.phi_backward(x, y, seed=0, step=0)["loss"],
        ):
            if sample:
                assert len(set(losses.tolist())) == 3, losses
            else:
                torch.testing.assert_close(losses, losses[:1].expand(3), rtol=1e-12, atol=0)


def test_phi_round_trips_through_its_file_and_corruption_is_detected(tmp_path):
    phi = phi_with().float()
    save_phi(tmp_path, phi, {"source": {"data": "unit-test"}})
    loaded = load_phi(tmp_path)
    for a, b in zip(phi.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert phi_info(tmp_path)["source"] == {"data": "unit-test"} and phi_info(tmp_path)["parameters"] == 82
    raw = bytearray((tmp_path / "phi.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "phi.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_phi(tmp_path)
    with pytest.raises(CheckpointError, match="no meta-trained perturbation"):
        load_phi(tmp_path / "missing")


def test_the_shipped_phi_loads_and_says_where_it_came_from():
    phi = load_phi("builtin")
    info = phi_info("builtin")
    assert sum(p.numel() for p in phi.parameters()) == 82
    assert info["source"] == {
        "data": "miniimagenet",
        "split": "train",
        "image_size": 32,
        "tasks": 10,
        "classes": 64,
        "train_images": 3200,
    }
    assert (
        info["backbone"] == "resnet20"
        and " perturb meta-train --preset perturb-miniimagenet-resnet20" in info["command"]
    )
    # It was meta-trained: the scale's kernels left their N(0, 0.01) initialization.
    assert phi.stat_kernels.abs().mean() > 0.05
