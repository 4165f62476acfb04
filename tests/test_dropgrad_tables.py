"""What DropGrad's tables need beyond DropGrad itself: the few-shot ResNet-18 of CloserLookFewShot
(episodic batch norm, functional forward, DropGrad's layer groups), Dropout on every meta-training
pass (Table 4's baseline) and MetaSGD*'s supervised pre-training feeding a meta-training run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import learner_for, random_image_batch
from metareg.build import source_state
from metareg.config import TransferConfig, parse_assignment
from metareg.errors import CheckpointError
from metareg.nets import BatchNorm, create_model
from metareg.perturb import build_perturbation
from metareg.runs.common import resolve
from metareg.runs.episodic import start_from_pretrained
from metareg.runs.transfer import transfer
from metareg.selection import select


def test_resnet18_is_closer_look_few_shot_s_network():
    """CloserLookFewShot's ResNet-18: a 7x7 stem, four stages of two basic blocks (64-512 channels,
    1x1-convolution shortcuts where the shape changes), global average pooling (a 7x7 map at 224x224)
    and a linear classifier with a zero bias; the episodic form has no running statistics anywhere."""
    net = create_model("resnet18", 5, in_channels=3, image_size=224)
    assert sum(p.numel() for p in net.parameters()) == 11_176_512 + 512 * 5 + 5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, BatchNorm) for m in net.modules()) == 1 + 8 * 2 + 3
    assert torch.equal(net.head.bias, torch.zeros(5))
    assert net.stem[0].kernel_size == (7, 7) and net.stem[0].stride == (2, 2)
    assert [b.conv1.stride[0] for b in net.blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    standard = create_model("resnet18", 5, in_channels=3, image_size=224, standard=True)
    assert isinstance(standard.blocks[0].bn1, nn.BatchNorm2d)
    names = [n for n, _ in net.named_parameters()]
    groups = net.layer_groups()
    assert select(names, "stem", groups) == ["stem.0.weight", "stem.1.weight", "stem.1.bias"]
    assert {n.split(".")[1] for n in select(names, "stage4+head", groups) if n.startswith("blocks")} == {"6", "7"}
    assert {n.split(".")[1] for n in select(names, "stage1", groups)} == {"0", "1"}


def test_resnet18_meta_gradient_matches_finite_differences():
    """Second-order MAML through the episodic ResNet-18 (narrow, float64): the meta-gradient of a
    classifier weight equals a central finite difference of the meta-loss (step 1e-7: ReLU and
    max-pool kinks lie within 1e-4 here); the first-order gradient is 30% off, so this catches a
    functional forward that cuts the graph."""
    torch.manual_seed(0)
    net = create_model("resnet18", 3, in_channels=1, image_size=16, widths=(2, 2, 2, 2)).double()
    learner = learner_for(net, lr=0.1, steps=2)
    batch = random_image_batch(tasks=1, size=16, shot=2)
    weight = net.head.weight
    (grad,) = torch.autograd.grad(learner.meta_loss(batch), [weight])
    eps = 1e-7

    def moved(delta: float) -> float:
        with torch.no_grad():
            weight[0, 0] += delta
        value = learner.meta_loss(batch).item()
        with torch.no_grad():
            weight[0, 0] -= delta
        return value

    up, down = moved(eps), moved(-eps)
    assert grad[0, 0].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_dropout_during_training_acts_on_every_meta_training_pass_only():
    """during=training: support and query passes of meta-training drop (train mode, sample or not),
    meta-testing (eval mode) does not; the default acts only where the scheme samples."""
    x = torch.randn(4, 3, 8, 8)
    for during, train_sample, train_query, eval_sample in (
        ("training", True, True, False),
        ("sampling", True, False, True),
    ):
        torch.manual_seed(0)
        net = create_model(
            "conv4",
            3,
            in_channels=3,
            image_size=8,
            channels=4,
            depth=2,
            perturbation=build_perturbation("dropout", {"p": 0.3, "during": during}),
        )

        def noisy(sample: bool, net: nn.Module = net) -> bool:
            return not torch.equal(net(x, sample=sample), net(x, sample=sample))

        net.train()
        assert (noisy(True), noisy(False)) == (train_sample, train_query), during
        net.eval()
        assert noisy(True) == eval_sample, during


def test_pretraining_starts_the_meta_training_run(tmp_path):
    """MetaSGD*: a supervised run's convolutions and batch-norm weights (into every per-step row)
    start a fresh meta-training run; the classifier does not; a run of another backbone is refused."""
    pre = resolve(
        "transfer-quickstart",
        None,
        [
            parse_assignment(o)
            for o in (
                "model.options={channels: 4}",
                "perturb.name=none",
                "against_base=false",
                "train.steps=2",
                "train.batch_size=8",
                "perturb.mc_samples=1",
            )
        ],
        schema=TransferConfig,
    )
    transfer(pre, tmp_path / "pre", progress=False)
    source, prefix = source_state(tmp_path / "pre")
    torch.manual_seed(0)
    net = create_model("conv4", 3, in_channels=3, image_size=28, channels=4, per_step_weights=True, norm_steps=2)
    learner = learner_for(net, steps=2)
    head = net.head.weight.detach().clone()
    assert (
        start_from_pretrained(learner, tmp_path / "pre") == 4 * 2 + 4 * 2
    )  # conv weight and bias, norm weight and bias
    for i in range(4):
        torch.testing.assert_close(net.blocks[i].conv.weight, source[f"{prefix}blocks.{i}.conv.weight"])
        torch.testing.assert_close(net.blocks[i].norm.bias, source[f"{prefix}blocks.{i}.norm.bias"].expand(2, -1))
    assert torch.equal(net.head.weight, head)
    wider = learner_for(create_model("conv4", 3, in_channels=3, image_size=28, channels=8), steps=2)
    with pytest.raises(CheckpointError, match="same backbone"):
        start_from_pretrained(wider, tmp_path / "pre")
