"""ResNet-12, the few-shot field's standard backbone (MetaOptNet, Lee et al. CVPR 2019, after TADAM and
SNAIL), with a perturbation slot in every block.

Four residual blocks of widths 64-160-320-640. A block is three 3x3 convolutions (no bias), each
followed by batch norm, with LeakyReLU(0.1) after the first two; the shortcut is a 1x1 convolution
with batch norm; the residual sum goes through LeakyReLU(0.1) and a 2x2 max-pool. On 84x84 images
the output is 640 x 5 x 5, flattened (16000 features, MetaOptNet's ``avg_pool=False`` for
miniImageNet; ``avg_pool=True`` averages it to 640) into a linear classifier. Convolutions start
He-normal (fan-out, leaky-ReLU gain), batch norm at weight 1 and bias 0, as the MetaOptNet code.

Regularization as MetaOptNet trains it (``drop_rate=0.1``): dropout with rate 0.1 after the first
two blocks and DropBlock (block size 5) after the last two, whose drop rate rises linearly from 0 to
0.1 over the first third of training (MetaOptNet: keep rate ``max(1 - 0.1 * t / 40000, 0.9)`` with t
counting forward passes, two per training batch, i.e. the first 20 of its 60 epochs of 1000
batches; here t is the trainer's progress, :meth:`set_training_progress`). Both act in training
passes (``sample=True``) of a module in training mode only.

Two forms (``metareg.nets.create_model``):

* episodic (the default, for MAML and the bilevel scheme): batch norm with batch statistics at
  train and test time (:class:`~metareg.nets.layers.BatchNorm`: per task, per Monte-Carlo copy,
  ``vmap``-safe), and **no dropout or DropBlock** (``drop_rate=0``). A deliberate deviation from
  MetaOptNet's training: MetaOptNet trains the embedding with a closed-form head and never adapts
  it, whereas in MAML the sampled passes are the inner loop's support passes, so DropBlock there
  would make every inner gradient a noisy one (a feature perturbation of the inner loop, which is
  what this library's perturbations, Meta-Dropout or the ``dropblock`` perturbation itself, are
  for, and what the MAML rows of the seeds do not have). ``drop_rate=0.1`` turns MetaOptNet's
  regularization on in the support passes of meta-training (never in the query pass, whose
  ``sample`` is False, nor at meta-test, in eval mode).
* ``standard=True`` (ordinary training, e.g. a transfer run): batch norm with running statistics
  and MetaOptNet's ``drop_rate=0.1``.

The perturbation slot of each block gets the residual sum as its pre-activation and the block's
input as its layer input (before the LeakyReLU and the pooling, as in the other residual nets); the
classifier has an output slot. Layer groups: ``first-block``, ``last-block``, ``head`` (and the
common ``full``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import BatchNorm, drop_blocks
from .registry import register_backbone
from .slots import LayerInfo, PerturbationFactory, identity_factory

SLOPE = 0.1  # LeakyReLU's negative slope
RAMP = 1 / 3  # DropBlock's rate reaches its target after this fraction of training (MetaOptNet: 20 of 60 epochs)


def _norm(channels: int, running_stats: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if running_stats else BatchNorm(channels)


class Block12(nn.Module):
    """One ResNet-12 block: three conv-BN (LeakyReLU between), a 1x1 conv-BN shortcut, the
    perturbation on the sum, LeakyReLU, 2x2 max-pool, then dropout or DropBlock (``drop``) at rate
    ``drop_rate`` in training passes."""

    def __init__(
        self,
        cin: int,
        cout: int,
        perturb: nn.Module,
        *,
        running_stats: bool = False,
        drop: str = "dropout",
        drop_rate: float = 0.0,
        block_size: int = 5,
    ):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout, running_stats)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(cout, running_stats)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(cout, running_stats)
        self.shortcut_conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.shortcut_bn = _norm(cout, running_stats)
        self.perturb = perturb
        self.drop, self.drop_rate, self.block_size = drop, drop_rate, block_size
        self.progress = 1.0

    @property
    def scheduled(self) -> bool:
        """DropBlock's rate follows training progress (a captured CUDA graph could not follow it)."""
        return self.drop == "dropblock" and self.drop_rate > 0

    def set_training_progress(self, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)

    @property
    def rate(self) -> float:
        """The current drop rate: DropBlock's ramps up over the first third of training."""
        if self.drop == "dropblock":
            return self.drop_rate * min(self.progress / RAMP, 1.0)
        return self.drop_rate

    def forward(self, x: Tensor, *, sample: bool = False, memory_format: torch.memory_format | None = None) -> Tensor:
        out = self.conv1(x)
        if memory_format is not None:
            out = out.contiguous(memory_format=memory_format)
        out = F.leaky_relu(self.bn1(out), SLOPE)
        out = F.leaky_relu(self.bn2(self.conv2(out)), SLOPE)
        pre = self.bn3(self.conv3(out)) + self.shortcut_bn(self.shortcut_conv(x))
        pre = self.perturb(pre, x, sample=sample)
        # max-pool before the LeakyReLU: it is increasing, so it commutes with the max (values and
        # gradients); it then runs on a 4x smaller tensor.
        out = F.leaky_relu(F.max_pool2d(pre, 2), SLOPE)
        rate = self.rate
        if not (sample and self.training and rate > 0):
            return out
        if self.drop == "dropblock":
            return drop_blocks(out, rate, self.block_size)
        return F.dropout(out, rate, training=True)


class ResNet12(nn.Module):
    """ResNet-12 (see the module docstring). ``widths``: the four blocks' channels; ``avg_pool``:
    average the last feature map instead of flattening it; ``running_stats``: batch norm with
    running statistics (ordinary training) instead of batch statistics (episodic);
    ``drop_rate``: MetaOptNet's dropout (blocks 1-2) and DropBlock (blocks 3-4, ``block_size``)
    rate, 0 for none."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 84,
        *,
        widths: Sequence[int] = (64, 160, 320, 640),
        avg_pool: bool = False,
        running_stats: bool = False,
        drop_rate: float = 0.0,
        block_size: int = 5,
        perturbation: PerturbationFactory = identity_factory,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet-12 has 4 blocks: give 4 positive widths, got {widths}")
        if not 0 <= drop_rate < 1 or block_size < 1:
            raise ValueError(f"drop_rate must be in [0, 1) and block_size >= 1, got {drop_rate}, {block_size}")
        if image_size < 16:
            raise ValueError(f"image_size {image_size} is too small for ResNet-12's four 2x2 poolings")
        blocks, size, cin = [], image_size, in_channels
        for i, width in enumerate(widths):
            info = LayerInfo(
                i,
                "conv",
                cin,
                width,
                kernel_size=3,
                padding=1,
                size=size,
                network_width=max(widths),
                input_size=image_size,
                running_stats=running_stats,
            )
            blocks.append(
                Block12(
                    cin,
                    width,
                    perturbation(info),
                    running_stats=running_stats,
                    drop="dropout" if i < 2 else "dropblock",
                    drop_rate=drop_rate,
                    block_size=block_size,
                )
            )
            size, cin = size // 2, width
        self.blocks = nn.ModuleList(blocks)
        self.avg_pool = avg_pool
        self.feature_dim = cin if avg_pool else cin * size * size
        self.head = nn.Linear(self.feature_dim, num_classes)
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
        self.perturbation_points = [f"blocks.{i}.perturb" for i in range(len(blocks))]
        owned = {id(m) for p in self.modules() if getattr(p, "is_perturbation", False) for m in p.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in owned:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def layer_groups(self) -> dict[str, list[str]]:
        """Named parameter groups (:mod:`metareg.selection`): the first and last blocks, the classifier."""
        return {"first-block": ["blocks.0.*"], "last-block": [f"blocks.{len(self.blocks) - 1}.*"], "head": ["head.*"]}

    def features(self, x: Tensor, *, sample: bool = False, memory_format: torch.memory_format | None = None) -> Tensor:
        """``memory_format``: the activations' layout from the first convolution on (the engine asks
        for channels-last on the query pass, as with the conv nets)."""
        for i, block in enumerate(self.blocks):
            x = block(x, sample=sample, memory_format=memory_format if i == 0 else None)
        return x.mean((-2, -1)) if self.avg_pool else x.flatten(1)

    def forward(self, x: Tensor, *, sample: bool = False, memory_format: torch.memory_format | None = None) -> Tensor:
        features = self.features(x, sample=sample, memory_format=memory_format)
        return self.head_perturb(self.head(features), features, sample=sample)


def _make(num_outputs, in_channels, image_size, perturbation, **options):
    return ResNet12(num_outputs, in_channels, image_size, perturbation=perturbation, **options)


register_backbone(
    "resnet12",
    _make,
    standard={"running_stats": True, "drop_rate": 0.1},
    description="ResNet-12 (MetaOptNet), 64-160-320-640",
)
