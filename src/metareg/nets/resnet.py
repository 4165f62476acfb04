"""Residual networks for ordinary (non-episodic) training, as MetaPerturb transfers to them.

* :class:`ResNet` with ``stem="cifar"``: He et al. (2016, Section 4.2) ResNet-(6n+2) for small
  images: a 3x3 stem with 16 channels, three stages of n basic blocks with 16, 32 and 64 channels,
  parameter-free shortcuts (option A: subsample and zero-pad channels). ResNet20/32/44/56 are
  n = 3/5/7/9.
* :class:`ResNet` with ``stem="imagenet"``: ResNet18 (7x7 stride-2 stem and a max-pool, four stages
  of two blocks with 64 to 512 channels, 1x1-convolution shortcuts). This is also the few-shot
  ResNet-18 of Chen et al.'s CloserLookFewShot, which DropGrad's released code uses: the same layers,
  He-normal (fan-out) convolutions, batch norm at 1 and 0, global average pooling (their
  ``AvgPool2d(7)`` at 224x224). Registered as ``resnet18`` in its episodic form (batch norm on batch
  statistics at train and test time, the CloserLookFewShot MAML's, and a zero classifier bias, as
  its MAML sets); ``standard=True`` gives the ordinarily trained form (running statistics).
  Difference: CloserLookFewShot's MAML classifier keeps PyTorch's default weight init, ours too.
* :class:`WideResNet`: Zagoruyko & Komodakis (2016) WRN-d-k with pre-activation blocks; WRN-28-2
  has 4 blocks per stage and 32, 64, 128 channels.

Every block has a perturbation slot (MetaPerturb Figure 3) named ``perturb``, filled by the
perturbation factory the network is built with (the identity by default): it gets the residual sum
as its pre-activation and the block's input as its layer input, before the block's final ReLU (for
the pre-activation WRN, which has none, the sum itself). ``model.perturbation_points`` lists the
slots for :func:`metareg.perturb.attach`; the classifier has an output slot too. Convolutions start
He-normal (fan-out), batch norm at weight 1 and bias 0, the released MetaPerturb code's
initialization.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import episodic_norm
from .registry import register_backbone
from .slots import LayerInfo, PerturbationFactory, identity_factory

Norm = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(cin: int, cout: int, stride: int, kind: Literal["pad", "conv"], norm: Norm = nn.BatchNorm2d) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))


class BasicBlock(nn.Module):
    """relu(perturb(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))); ``norm`` builds its batch norms."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        shortcut: Literal["pad", "conv"],
        perturb: nn.Module,
        norm: Norm = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), norm(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), norm(cout)
        self.shortcut = _shortcut(cin, cout, stride, shortcut, norm)
        self.perturb = perturb

    def forward(self, x: Tensor, *, sample: bool = False) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.perturb(out + self.shortcut(x), x, sample=sample))


class WideBlock(nn.Module):
    """Pre-activation block: perturb(conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut), the
    shortcut a 1x1 convolution of relu(bn1(x)) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, perturb: nn.Module):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.project = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.perturb = perturb

    def forward(self, x: Tensor, *, sample: bool = False) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return self.perturb(out + (x if self.project is None else self.project(pre)), x, sample=sample)


def _init(model: nn.Module) -> None:
    """He-normal convolutions, unit batch norm; the perturbations keep their own initialization."""
    owned = {id(m) for p in model.modules() if getattr(p, "is_perturbation", False) for m in p.modules()}
    for m in model.modules():
        if id(m) in owned:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stages(
    block: Callable[[int, int, int, nn.Module], nn.Module],
    counts: Sequence[int],
    widths: Sequence[int],
    cin: int,
    size: int,
    image_size: int,
    perturbation: PerturbationFactory,
    running_stats: bool = True,
) -> tuple[list[nn.Module], int, int]:
    """The residual stages: ``counts[s]`` blocks of ``widths[s]`` channels, the first of every stage
    after the first with stride 2, each with its perturbation slot. Returns (blocks, channels, size).
    A slot is ``before_pooling`` when the next block halves the resolution or the global average
    pooling follows (the last block of every stage)."""
    layers: list[nn.Module] = []
    total = sum(counts)
    for stage, (count, width) in enumerate(zip(counts, widths)):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            size = (size + stride - 1) // stride
            info = LayerInfo(
                len(layers),
                "conv",
                cin,
                width,
                kernel_size=3,
                stride=stride,
                padding=1,
                size=size,
                network_width=max(widths),
                input_size=image_size,
                running_stats=running_stats,
                layers=total,
                before_pooling=i == count - 1,
            )
            layers.append(block(cin, width, stride, perturbation(info)))
            cin = width
    return layers, cin, size


class _ResidualNet(nn.Module):
    """What the residual networks share: blocks with slots, a classifier with its output slot."""

    stem: nn.Module  # each network's own

    def _finish(
        self,
        layers: list[nn.Module],
        features: int,
        num_classes: int,
        perturbation: PerturbationFactory,
        width: int,
        image_size: int,
        counts: Sequence[int],
        running_stats: bool = True,
    ) -> None:
        """The blocks, the classifier with its output slot, the slot names and the initialization;
        ``counts``: the blocks per stage (for the ``stage<k>`` groups)."""
        self.blocks = nn.ModuleList(layers)
        self.stage_counts = tuple(counts)
        self.head = nn.Linear(features, num_classes)
        self.head_perturb = perturbation(
            LayerInfo(
                len(layers),
                "dense",
                features,
                num_classes,
                output=True,
                network_width=width,
                input_size=image_size,
                running_stats=running_stats,
            )
        )
        self.perturbation_points = [f"blocks.{i}.perturb" for i in range(len(layers))]
        _init(self)

    def layer_groups(self) -> dict[str, list[str]]:
        """Named parameter groups (:mod:`metareg.selection`): the stem and first block, the last block,
        the classifier, the ``stem`` alone and each stage (``stage1``, ...: DropGrad's Table 2 calls
        ResNet-18's stem "Conv" and its four stages "Block1" to "Block4")."""
        last = len(self.blocks) - 1
        groups = {"first-block": ["stem.*", "blocks.0.*"], "last-block": [f"blocks.{last}.*"], "head": ["head.*"]}
        groups["stem"] = ["stem.*"]
        first = 0
        for stage, count in enumerate(self.stage_counts, 1):
            groups[f"stage{stage}"] = [f"blocks.{i}.*" for i in range(first, first + count)]
            first += count
        return groups

    def pool(self, x: Tensor) -> Tensor:
        return x.mean((-2, -1))

    def forward(self, x: Tensor, *, sample: bool = False) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, sample=sample)
        features = self.pool(x)
        return self.head_perturb(self.head(features), features, sample=sample)


class ResNet(_ResidualNet):
    """A ResNet of :class:`BasicBlock` stages: ``blocks`` per stage and ``widths`` per stage.

    ``running_stats=False``: the episodic form (MAML-style meta-learning): every batch norm is
    :class:`~metareg.nets.layers.BatchNorm` (batch statistics at train and test time, optionally
    MAML++'s per-step weights and statistics: ``norm_steps``, ``per_step_weights``,
    ``per_step_stats``, ``stats_at_test``), and the classifier bias starts at 0.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        *,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        stem: Literal["cifar", "imagenet"] = "cifar",
        shortcut: Literal["pad", "conv"] = "pad",
        perturbation: PerturbationFactory = identity_factory,
        running_stats: bool = True,
        norm_steps: int = 1,
        per_step_weights: bool = False,
        per_step_stats: bool = False,
        stats_at_test: bool = False,
    ):
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"give one block count per stage width, got {list(blocks)} and {list(widths)}")
        if stem not in ("cifar", "imagenet") or shortcut not in ("pad", "conv"):
            raise ValueError(f"stem must be cifar or imagenet and shortcut pad or conv, got {stem!r}, {shortcut!r}")
        if running_stats and (per_step_weights or per_step_stats):
            raise ValueError("per-step batch norm is for the episodic form (running_stats=False)")
        norm: Norm = (
            nn.BatchNorm2d
            if running_stats
            else episodic_norm(
                norm_steps=norm_steps,
                per_step_weights=per_step_weights,
                per_step_stats=per_step_stats,
                stats_at_test=stats_at_test,
            )
        )
        first = widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, first), norm(first), nn.ReLU())
            size = image_size
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False),
                norm(first),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            size = (image_size + 1) // 2 // 2
        layers, cin, size = _stages(
            lambda cin, width, stride, perturb: BasicBlock(cin, width, stride, shortcut, perturb, norm),
            blocks,
            widths,
            first,
            size,
            image_size,
            perturbation,
            running_stats,
        )
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for this ResNet")
        self._finish(layers, cin, num_classes, perturbation, max(widths), image_size, blocks, running_stats)
        if not running_stats:
            nn.init.zeros_(self.head.bias)


class WideResNet(_ResidualNet):
    """WRN-``depth``-``widen``: (depth - 4) / 6 pre-activation blocks in each of 3 stages of
    16k, 32k, 64k channels after a 16-channel 3x3 stem; batch norm, ReLU, pooling, classifier."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        *,
        depth: int = 28,
        widen: int = 2,
        perturbation: PerturbationFactory = identity_factory,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (e.g. 16, 22, 28, 40), got {depth}")
        if image_size < 4:
            raise ValueError(f"image_size {image_size} is too small for a WRN")
        per_stage = (depth - 4) // 6
        self.stem = _conv3x3(in_channels, 16)
        widths = (16 * widen, 32 * widen, 64 * widen)
        layers, cin, _ = _stages(WideBlock, (per_stage,) * 3, widths, 16, image_size, image_size, perturbation)
        self.norm = nn.BatchNorm2d(cin)
        self._finish(layers, cin, num_classes, perturbation, max(widths), image_size, (per_stage,) * 3)

    def pool(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(x)).mean((-2, -1))


def _resnet(cls: type, **defaults):
    def make(num_outputs, in_channels, image_size, perturbation, **options):
        return cls(num_outputs, in_channels, image_size, perturbation=perturbation, **(defaults | options))

    # make.__wrapped__ = cls: its options are the class's (checked against its signature)
    return functools.update_wrapper(make, cls, assigned=(), updated=())


for _n in (3, 5, 7, 9):
    register_backbone(
        f"resnet{6 * _n + 2}", _resnet(ResNet, blocks=(_n, _n, _n)), description=f"CIFAR ResNet-{6 * _n + 2} (option A)"
    )
register_backbone(
    "resnet18",
    _resnet(
        ResNet, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet", shortcut="conv", running_stats=False
    ),
    standard={"running_stats": True},
    description="ResNet-18, ImageNet stem (CloserLookFewShot's few-shot backbone; episodic batch norm, "
    "standard form: running statistics)",
)
register_backbone("wrn-28-2", _resnet(WideResNet, depth=28, widen=2), description="WRN-28-2")
