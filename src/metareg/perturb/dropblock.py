"""DropBlock (Ghiasi, Lin & Le, NeurIPS 2018), a baseline of MetaPerturb's Table 1: dropout of
contiguous square blocks of a feature map instead of single units.

Each block is dropped around a center drawn with probability

    gamma = p / block_size^2 * feat^2 / (feat - block_size + 1)^2

(so that about a fraction p of the units is dropped), the mask is the max-pool of the centers over
``block_size`` x ``block_size`` windows, and the kept units are rescaled by (units / kept units).
The paper's settings: ``block_size = 7`` and a drop rate that rises linearly from 0 to ``p = 0.1``
over training (``schedule="linear"``; the trainer reports its progress). Where a feature map is
smaller than the block, the block is the whole map's side. Hidden conv layers, after batch norm and
before the ReLU, in training passes only (``sample``); identity otherwise.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.layers import drop_blocks
from ..nets.slots import FeaturePerturbation, LayerInfo, PerturbationFactory
from .registry import register


class DropBlock(FeaturePerturbation):
    position = "norm"

    def __init__(self, p: float = 0.1, block_size: int = 7, schedule: Literal["constant", "linear"] = "linear"):
        super().__init__()
        if not 0 <= p < 1 or block_size < 1 or schedule not in ("constant", "linear"):
            raise ConfigError(
                f"dropblock needs p in [0, 1), block_size >= 1 and schedule constant or linear, got {p}, "
                f"{block_size}, {schedule!r}"
            )
        self.p, self.block_size, self.schedule = p, block_size, schedule
        self.progress = 1.0

    @property
    def scheduled(self) -> bool:
        return self.schedule == "linear"

    def set_training_progress(self, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)

    @property
    def rate(self) -> float:
        return self.p * self.progress if self.schedule == "linear" else self.p

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:  # noqa: ARG002
        return drop_blocks(pre, self.rate, self.block_size) if sample else pre

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}, schedule={self.schedule}"


@register("dropblock")
def dropblock(
    p: float = 0.1, block_size: int = 7, schedule: Literal["constant", "linear"] = "linear"
) -> PerturbationFactory:
    def make(info: LayerInfo) -> nn.Module:
        return FeaturePerturbation() if info.output or info.kind != "conv" else DropBlock(p, block_size, schedule)

    return make
