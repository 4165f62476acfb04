"""One perturbation slot for every scheme and backbone: MetaPerturb inside MAML, Meta-Dropout's noise
generators in the joint scheme, perturbation factories in the residual networks, one selector."""

from __future__ import annotations

import pytest
import torch

from helpers import META_TRAIN_KEYS, assert_same_tensors, tensors_of, tiny
from metareg.build import build_learner
from metareg.config import MetaTrainConfig, parse_assignment
from metareg.errors import ConfigError
from metareg.meta.joint import JointLearner
from metareg.nets import create_model, perturbation_parameter_names
from metareg.perturb import MetaPerturb, MultiplicativeNoise, build_perturbation
from metareg.runs.common import resolve
from metareg.runs.episodic import meta_test, train
from metareg.runs.metaperturb import meta_train
from metareg.selection import select

REF_FAST = "model.options={channels: 4, init: truncated_normal, norm_scale: false}"


def maml_with_metaperturb(*extra: str):
    return tiny(
        "perturb.name=metaperturb",
        "perturb.options={phi: learned}",
        REF_FAST,
        "inner.fast=[blocks.*.conv.*, head.weight, head.bias]",
        "inner.eval_mc_samples=2",
        *extra,
    )


def test_metaperturb_phi_learns_through_mamls_inner_loop():
    """MAML + MetaPerturb: phi (82 parameters, owned once by the network) is meta-only, gets a
    second-order meta-gradient through the inner steps, and none when the inner loop is cut."""
    learner = build_learner(maml_with_metaperturb())
    phi = perturbation_parameter_names(learner.model)
    assert len(phi) == 6 and sum(learner.model.get_parameter(n).numel() for n in phi) == 82
    assert not set(phi) & set(learner.fast_names)
    slots = [m for m in learner.model.modules() if isinstance(m, MetaPerturb)]
    assert len(slots) == 4 and not any(
        s.running_stats for s in slots
    )  # episodic: batch statistics, no running averages
    from metareg.data import build_task_source

    batch = build_task_source("glyphs", "train", way=3, shot=2, query=2, num_classes=30).sample(
        2, torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    learner.meta_backward(batch)
    grads = {n: learner.model.get_parameter(n).grad for n in phi}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # First-order meta-gradients would drop the path through the inner steps, the one through which
    # phi learns from its sampled noise: refused, as for Meta-Dropout.
    with pytest.raises(ConfigError, match="first-order"):
        build_learner(maml_with_metaperturb("inner.first_order=true"))
    # The query pass is deterministic; the support pass samples.
    x = batch.query_x[0]
    model = learner.model
    assert torch.equal(model(x, sample=False), model(x, sample=False))
    assert not torch.equal(model(x, sample=True), model(x, sample=True))


@pytest.mark.slow
def test_the_metaperturb_maml_preset_trains_and_tests_smoke(tmp_path):
    """Smoke test: MAML + MetaPerturb trains 2 iterations and meta-tests with the configured noise
    samples without error (the accuracy is only checked to be a probability); the preset's settings
    are checked exactly. The numbers are checked by test_metaperturb_phi_learns_through_mamls_inner_loop
    and the engine's reference tests."""
    config = maml_with_metaperturb("train.steps=2")
    trainer = train(config, tmp_path / "run", progress=False)
    result = meta_test(config, trainer.learner, episodes=3, progress=False)
    assert result.protocol["mc_samples"] == 2 and 0 <= result.estimate.mean <= 1
    preset = resolve("omniglot-20w1s-metaperturb")
    assert preset.perturb.name == "metaperturb" and preset.inner.eval_mc_samples == 30
    assert preset.inner.fast == ["blocks.*.conv.*", "head.weight", "head.bias"]


def test_residual_networks_take_perturbation_factories():
    """Meta-Dropout's noise generator (a layer shaped like the block's) in every ResNet block,
    with the block input as its layer input; the output layer gets the additive Gaussian."""
    net = create_model(
        "resnet20", 5, in_channels=3, image_size=16, blocks=(1, 1, 1), perturbation=build_perturbation("meta-dropout")
    )
    noises = [m for m in net.modules() if isinstance(m, MultiplicativeNoise)]
    assert len(noises) == 3 and [m.phi.stride for m in noises] == [(1, 1), (2, 2), (2, 2)]
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    assert torch.equal(net(x, sample=False), net(x, sample=False)) and not torch.equal(
        net(x, sample=True), net(x, sample=True)
    )
    groups = net.layer_groups()
    names = [n for n, _ in net.named_parameters()]
    assert select(names, "head", groups) == ["head.weight", "head.bias"]
    assert all(n.startswith("blocks.2.") for n in select(names, "last-block", groups))


def test_the_joint_scheme_learns_meta_dropouts_noise_generators():
    factory = build_perturbation("meta-dropout")

    def build(t):
        torch.manual_seed(t)
        return create_model("conv4", 4, in_channels=3, image_size=16, channels=4, standard=True, perturbation=factory)

    learner = JointLearner(build, [0, 1, 2], 3, input_shape=(3, 16, 16)).double()
    names = learner.phi_names
    assert names and all(".perturb." in n or n.startswith("head_perturb.") for n in names)
    for net in learner.networks[1:]:  # one phi, shared by every task network
        assert all(net.get_parameter(n) is learner.networks[0].get_parameter(n) for n in names)
    assert not {id(p) for p in learner.phi_parameters()} & {id(p) for p in learner.theta_parameters()}
    x, y = torch.randn(3, 5, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (3, 5))
    learner.theta_backward(x, y, seed=0, step=0)
    assert all(p.grad is None for p in learner.phi_parameters())
    learner.phi_backward(x, y, seed=0, step=0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.phi_parameters())


def test_a_perturbation_without_parameters_cannot_be_meta_trained():
    def build(_t):
        return create_model(
            "conv4",
            4,
            in_channels=3,
            image_size=16,
            channels=4,
            standard=True,
            perturbation=build_perturbation("dropout", {"p": 0.2}),
        )

    with pytest.raises(ConfigError, match="has none"):
        JointLearner(build, [0, 1], 2, input_shape=(3, 16, 16))


@pytest.mark.slow
def test_the_joint_meta_dropout_preset_runs_and_resumes(tmp_path):
    values = [
        "train.steps=4",
        "train.batch_size=4",
        "train.checkpoint_every=2",
        "data.classes=12",
        "data.options={num_classes: 12}",
        "tasks=3",
        "data.image_size=16",
        "model.options={channels: 4}",
    ]

    def config(steps):
        return resolve(
            "perturb-quickstart-metadropout",
            overrides=[parse_assignment(s) for s in [*values, f"train.steps={steps}"]],
            schema=MetaTrainConfig,
        )

    straight = meta_train(config(4), tmp_path / "straight", progress=False)
    meta_train(config(2), tmp_path / "split", progress=False)
    resumed = meta_train(config(4), tmp_path / "split", resume=True, progress=False)
    a, b = straight.learner.phi_state(), resumed.learner.phi_state()
    assert_same_tensors(a, b, ("*perturb.phi.weight",))
    assert_same_tensors(tensors_of(tmp_path / "straight"), tensors_of(tmp_path / "split"), META_TRAIN_KEYS[:2])
    assert not (tmp_path / "straight" / "phi.json").exists()  # phi.json is MetaPerturb's format
