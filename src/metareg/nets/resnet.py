"""Residual networks for ordinary (non-episodic) training, as MetaPerturb transfers to them.

* :class:`ResNet` with ``stem="cifar"``: He et al. (2016, Section 4.2) ResNet-(6n+2) for small
  images: a 3x3 stem with 16 channels, three stages of n basic blocks with 16, 32 and 64 channels,
  parameter-free shortcuts (option A: subsample and zero-pad channels). ResNet20/32/44/56 are
  n = 3/5/7/9.
* :class:`ResNet` with ``stem="imagenet"``: ResNet18 (7x7 stride-2 stem and a max-pool, four stages
  of two blocks with 64 to 512 channels, 1x1-convolution shortcuts).
* :class:`WideResNet`: Zagoruyko & Komodakis (2016) WRN-d-k with pre-activation blocks; WRN-28-2
  has 4 blocks per stage and 32, 64, 128 channels.

Every block's output is a perturbation point (MetaPerturb Figure 3): an ``nn.Identity`` named
``perturb`` applied to the residual sum, before the block's final ReLU (for the pre-activation
WRN, which has none, to the sum itself). ``model.perturbation_points`` lists them for
:func:`metareg.perturb.attach_metaperturb`. Convolutions start He-normal (fan-out), batch norm at
weight 1 and bias 0, the released MetaPerturb code's initialization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn


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


def _shortcut(cin: int, cout: int, stride: int, kind: Literal["pad", "conv"]) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """relu(perturb(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: Literal["pad", "conv"]):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, shortcut)
        self.perturb = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.perturb(out + self.shortcut(x)))


class WideBlock(nn.Module):
    """Pre-activation block: perturb(conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut), the
    shortcut a 1x1 convolution of relu(bn1(x)) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.project = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.perturb = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return self.perturb(out + (x if self.project is None else self.project(pre)))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages: ``blocks`` per stage and ``widths`` per stage."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, *, blocks: Sequence[int] = (3, 3, 3),
                 widths: Sequence[int] = (16, 32, 64), stem: Literal["cifar", "imagenet"] = "cifar",
                 shortcut: Literal["pad", "conv"] = "pad"):
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"give one block count per stage width, got {list(blocks)} and {list(widths)}")
        if stem not in ("cifar", "imagenet") or shortcut not in ("pad", "conv"):
            raise ValueError(f"stem must be cifar or imagenet and shortcut pad or conv, got {stem!r}, {shortcut!r}")
        first = widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, first), nn.BatchNorm2d(first), nn.ReLU())
            size = image_size
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(first),
                                      nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
            size = (image_size + 1) // 2 // 2
        layers, cin = [], first
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(cin, width, stride, shortcut))
                size = (size + stride - 1) // stride
                cin = width
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for this ResNet")
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.perturbation_points = [f"blocks.{i}.perturb" for i in range(len(layers))]
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((-2, -1)))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: (depth - 4) / 6 pre-activation blocks in each of 3 stages of
    16k, 32k, 64k channels after a 16-channel 3x3 stem; batch norm, ReLU, pooling, classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, *, depth: int = 28, widen: int = 2):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (e.g. 16, 22, 28, 40), got {depth}")
        if image_size < 4:
            raise ValueError(f"image_size {image_size} is too small for a WRN")
        per_stage = (depth - 4) // 6
        self.stem = _conv3x3(in_channels, 16)
        layers, cin = [], 16
        for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(per_stage):
                layers.append(WideBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)
        self.perturbation_points = [f"blocks.{i}.perturb" for i in range(len(layers))]
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.norm(self.blocks(self.stem(x)))).mean((-2, -1)))
