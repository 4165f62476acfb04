"""Weight Gaussian, the ablation of Meta-Dropout's Table 3: fully factorized Gaussian weights whose
variances are meta-learned,

    W~ = W + sigma o eps,   eps ~ N(0, I),   sigma = Softplus(rho)   (rho meta-learned, per weight)

sampled where the inner loop samples (the support set), W itself on the query set. The layer is
linear in W, so the perturbed output is ``f(h; W) + f(h; sigma o eps)``: the slot adds the second
term to the layer's output (before batch norm), one weight sample per forward pass. Every layer,
the output layer included, is perturbed. The paper gives no initial sigma; ours is 0.01, half the
std of the reference's initial weights (``init_std``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.layers import copies
from ..nets.slots import FeaturePerturbation, LayerInfo, PerturbationFactory, required_input
from .registry import register


class WeightGaussian(FeaturePerturbation):
    position = "linear"

    def __init__(self, info: LayerInfo, init_std: float = 0.01):
        super().__init__()
        if init_std <= 0:
            raise ConfigError(f"weight-gaussian init_std must be > 0, got {init_std}")
        shape = (info.out_features, info.in_features) + ((info.kernel_size,) * 2 if info.kind == "conv" else ())
        self.rho = nn.Parameter(torch.full(shape, math.log(math.expm1(init_std))))  # Softplus(rho) = init_std
        self.kind, self.stride, self.padding = info.kind, info.stride, info.padding

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:
        if not sample:
            return pre
        layer_input = required_input(layer_input, "weight-gaussian")
        count = copies()  # stacked independent copies of the batch: one weight sample each
        noise = F.softplus(self.rho) * torch.randn(count, *self.rho.shape, dtype=self.rho.dtype, device=self.rho.device)
        if count == 1:
            noise = noise[0]
            if self.kind == "conv":
                return pre + F.conv2d(layer_input, noise, stride=self.stride, padding=self.padding)
            return pre + F.linear(layer_input.flatten(1), noise)
        n = layer_input.shape[0] // count
        if self.kind == "conv":  # the copies as groups of one convolution
            x = (
                layer_input.reshape(count, n, *layer_input.shape[1:])
                .transpose(0, 1)
                .reshape(n, -1, *layer_input.shape[2:])
            )
            out = F.conv2d(x, noise.flatten(0, 1), stride=self.stride, padding=self.padding, groups=count)
            return pre + out.reshape(n, count, -1, *out.shape[2:]).transpose(0, 1).reshape(pre.shape)
        x = layer_input.flatten(1).reshape(count, n, -1)
        return pre + torch.bmm(x, noise.transpose(1, 2)).reshape(pre.shape)


@register("weight-gaussian")
def weight_gaussian(init_std: float = 0.01) -> PerturbationFactory:
    return lambda info: WeightGaussian(info, init_std)
