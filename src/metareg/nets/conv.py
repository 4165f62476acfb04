"""Conv4 / ConvN of Finn et al. (2017) and the plain VGG-style CNNs of MetaPerturb's Table 2 (Conv4,
Conv6, VGG9), with a feature-perturbation slot in every block."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Transform, bias_of, episodic_norm, truncated_normal_
from .registry import register_backbone
from .slots import LayerInfo, PerturbationFactory, identity_factory


class ConvBlock(nn.Module):
    """3x3 'same' conv -> batch norm -> ReLU -> 2x2 max-pool, with the perturbation after the conv
    or after the norm (its ``position``, see :mod:`metareg.nets.slots`).

    ``strided=True`` replaces the max-pool by a stride-2 convolution (MAML's Omniglot variant);
    ``pool=False`` keeps the resolution (VGG's blocks between poolings). ``running_stats=False``:
    batch statistics at train and test time (episodic training, :class:`~metareg.nets.layers.BatchNorm`,
    built by ``norm``: see :func:`~metareg.nets.layers.episodic_norm`); ``True``: ordinary batch norm
    with running statistics for ordinary training. ``activation``: ``relu`` or ``leaky_relu``
    (slope 0.01, the MAML++ network's).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        perturb: nn.Module,
        strided: bool = False,
        transform: bool = False,
        norm_scale: bool = True,
        pool: bool = True,
        running_stats: bool = False,
        norm: Callable[[int], nn.Module] | None = None,
        activation: Literal["relu", "leaky_relu"] = "relu",
    ):
        super().__init__()
        self.strided = strided
        self.pool = pool and not strided
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2 if strided else 1, padding=1)
        self.transform = Transform(out_channels, conv=True) if transform else None
        make_norm = norm or episodic_norm(scale=norm_scale)
        self.norm = nn.BatchNorm2d(out_channels) if running_stats else make_norm(out_channels)
        self.perturb = perturb
        self.perturb_before_norm = getattr(perturb, "position", "norm") == "linear"
        self.activation = F.leaky_relu if activation == "leaky_relu" else F.relu

    def forward(self, x: Tensor, *, sample: bool = False, memory_format: torch.memory_format | None = None) -> Tensor:
        y = self.conv(x)
        if self.transform is not None:
            y = self.transform(y)
        if memory_format is not None:
            y = y.contiguous(memory_format=memory_format)
        if self.perturb_before_norm:
            pre = self.norm(self.perturb(y, x, sample=sample))
        else:
            pre = self.perturb(self.norm(y), x, sample=sample)
        # max-pool before ReLU: ReLU (and leaky ReLU) is monotone, so max(relu(a), relu(b)) =
        # relu(max(a, b)) and the gradients agree too; the ReLU then runs on a 4x smaller tensor.
        return self.activation(F.max_pool2d(pre, 2) if self.pool else pre)


class ConvNet(nn.Module):
    """``depth`` conv blocks and a linear classifier on the flattened features.

    Conv4 for Omniglot: 64 channels, 28x28 input (1x1x64 features). Conv4 for miniImageNet: 32
    channels, 84x84 input (5x5x32 = 800 features). ``channels`` may list one width per block (then
    it sets the depth) and ``pool`` which blocks max-pool (default: all): VGG9 is
    ``channels=[64, 128, 256, 256, 512, 512, 512, 512]``, ``pool=[1, 1, 0, 1, 0, 1, 0, 1]``
    (five poolings, as in the MetaPerturb reference). The perturbation factory is asked for one module
    per conv block and one for the classifier (``LayerInfo.output``; Meta-Dropout's additive
    Gaussian sits there, most perturbations return the identity). ``transform=True`` adds T-net's
    meta-learned 1x1 convolution T after every conv W (and an n x n T after the classifier),
    initialized to the identity. ``init="truncated_normal"``: the Meta-Dropout reference's init
    (conv weights truncated normal std 0.02, classifier weights normal std 0.02, zero biases);
    ``"kaiming"``: He normal (fan-out) conv weights, the MetaPerturb reference's; ``"xavier"``:
    Glorot uniform conv and classifier weights, zero biases (the MAML++ reference's); ``"default"``:
    PyTorch's. ``norm_scale=False``: batch norm with a shift only (the Meta-Dropout reference).
    ``running_stats=True``: batch norm with running statistics (ordinary, non-episodic training).
    MAML++'s per-step batch norm (episodic only): ``per_step_weights`` (BNWB), ``per_step_stats``
    (BNRS) and ``stats_at_test`` with ``norm_steps`` rows, one per inner step (a run's config fills
    ``norm_steps`` from ``inner.steps``); see :class:`~metareg.nets.layers.BatchNorm`.
    ``activation``: ``relu`` or ``leaky_relu`` (MAML++'s).
    ``perturbation_points`` names the blocks' perturbation slots, where
    :func:`metareg.perturb.attach_metaperturb` hooks in (after batch norm, before pooling and ReLU).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        channels: int | Sequence[int] = 64,
        depth: int = 4,
        strided: bool = False,
        perturbation: PerturbationFactory = identity_factory,
        transform: bool = False,
        init: Literal["default", "truncated_normal", "kaiming", "xavier"] = "default",
        norm_scale: bool = True,
        pool: Sequence[bool] | None = None,
        running_stats: bool = False,
        norm_steps: int = 1,
        per_step_weights: bool = False,
        per_step_stats: bool = False,
        stats_at_test: bool = False,
        activation: Literal["relu", "leaky_relu"] = "relu",
    ):
        super().__init__()
        if init not in ("default", "truncated_normal", "kaiming", "xavier"):
            raise ValueError(f"init must be default, truncated_normal, kaiming or xavier, got {init!r}")
        if activation not in ("relu", "leaky_relu"):
            raise ValueError(f"activation must be relu or leaky_relu, got {activation!r}")
        if running_stats and (per_step_weights or per_step_stats):
            raise ValueError("per-step batch norm is for episodic networks (running_stats=False)")
        norm = episodic_norm(
            scale=norm_scale,
            norm_steps=norm_steps,
            per_step_weights=per_step_weights,
            per_step_stats=per_step_stats,
            stats_at_test=stats_at_test,
        )
        widths = [channels] * depth if isinstance(channels, int) else [int(c) for c in channels]
        pools = [True] * len(widths) if pool is None else [bool(p) for p in pool]
        if len(pools) != len(widths) or not widths:
            raise ValueError(f"pool must give one flag per block ({len(widths)}), got {len(pools)}")
        blocks: list[ConvBlock] = []
        size, cin = image_size, in_channels
        for i, (width, pooled) in enumerate(zip(widths, pools)):
            slot_size = (size + 1) // 2 if strided else size
            info = LayerInfo(
                i,
                "conv",
                cin,
                width,
                kernel_size=3,
                stride=2 if strided else 1,
                padding=1,
                size=slot_size,
                network_width=max(widths),
                input_size=image_size,
                running_stats=running_stats,
                layers=len(widths),
                # the feature map is next reduced: this block's max-pool, the next block's strided
                # convolution (the last block of a strided net is only flattened)
                before_pooling=pooled if not strided else i < len(widths) - 1,
            )
            blocks.append(
                ConvBlock(
                    cin,
                    width,
                    perturbation(info),
                    strided=strided,
                    transform=transform,
                    norm_scale=norm_scale,
                    pool=pooled,
                    running_stats=running_stats,
                    norm=norm,
                    activation=activation,
                )
            )
            size = (size + 1) // 2 if strided else (size // 2 if pooled else size)
            cin = width
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {sum(pools)} poolings")
        self.blocks = nn.ModuleList(blocks)
        self.perturbation_points = [f"blocks.{i}.perturb" for i in range(len(blocks))]
        self.feature_dim = cin * size * size
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.head_transform = Transform(num_classes) if transform else None
        self.head_perturb = perturbation(
            LayerInfo(
                len(blocks),
                "dense",
                self.feature_dim,
                num_classes,
                output=True,
                network_width=max(widths),
                input_size=image_size,
                running_stats=running_stats,
            )
        )
        if init == "kaiming":
            for block in blocks:
                nn.init.kaiming_normal_(block.conv.weight, mode="fan_out", nonlinearity="relu")
        if init == "truncated_normal":
            for block in blocks:
                truncated_normal_(block.conv.weight, 0.02)
                nn.init.zeros_(bias_of(block.conv))
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if init == "xavier":
            layers: list[nn.Conv2d | nn.Linear] = [*(block.conv for block in blocks), self.head]
            for layer in layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(bias_of(layer))

    def layer_groups(self) -> dict[str, list[str]]:
        """Named parameter groups (:mod:`metareg.selection`): the first and last conv blocks, the classifier."""
        last = len(self.blocks) - 1
        return {
            "first-block": ["blocks.0.*"],
            "last-block": [f"blocks.{last}.*"],
            "head": ["head.*", "head_transform.*"],
        }

    def features(self, x: Tensor, *, sample: bool = False, memory_format: torch.memory_format | None = None) -> Tensor:
        """``memory_format``: the layout of the activations from the first convolution on (the
        engine asks for ``torch.channels_last`` on the query pass, where it is faster on CPU)."""
        for i, block in enumerate(self.blocks):
            x = block(x, sample=sample, memory_format=memory_format if i == 0 else None)
        return x.flatten(1)

    def forward(self, x: Tensor, *, sample: bool = False, memory_format: torch.memory_format | None = None) -> Tensor:
        features = self.features(x, sample=sample, memory_format=memory_format)
        out = self.head(features)
        out = out if self.head_transform is None else self.head_transform(out)
        return self.head_perturb(out, features, sample=sample)


def _convnet(**defaults):
    def make(num_outputs, in_channels, image_size, perturbation, **options):
        return ConvNet(num_outputs, in_channels, image_size, perturbation=perturbation, **(defaults | options))

    # make.__wrapped__ = ConvNet: its options are ConvNet's (checked against its signature)
    return functools.update_wrapper(make, ConvNet, assigned=(), updated=())


VGG9_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
VGG9_POOLS = (1, 1, 0, 1, 0, 1, 0, 1)
CONV6_POOLS = (1, 1, 0, 1, 0, 1)  # four poolings, as in the MetaPerturb reference's Conv6
# Ordinary training of the conv nets: batch norm with running statistics, He-normal convolutions.
_STANDARD = {"running_stats": True, "init": "kaiming"}
register_backbone("conv4", _convnet(depth=4), standard=_STANDARD, description="Finn et al.'s Conv4 (64 or 32 channels)")
register_backbone("conv6", _convnet(depth=6, pool=CONV6_POOLS), standard=_STANDARD, description="Conv6, four poolings")
register_backbone(
    "vgg9",
    _convnet(channels=VGG9_WIDTHS, pool=VGG9_POOLS),
    standard=_STANDARD,
    description="VGG9 (MetaPerturb Table 2)",
)
