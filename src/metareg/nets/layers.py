"""Layers shared by the backbones, written for functional (``torch.func.functional_call``) use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchNorm(nn.Module):
    """Batch normalization with batch statistics at train *and* test time (MAML convention).

    Episodic meta-learning normalizes each task's batch by its own statistics (transductive, as in
    Finn et al. 2017); there are no running statistics. ``explicit=True`` writes the normalization
    as explicit mean/variance ops, which is what ``torch.func.vmap`` needs: under ``vmap``,
    ``F.batch_norm`` silently gives wrong second-order gradients. ``scale=False``: a shift only, no
    learned scale (TensorFlow's ``batch_norm`` default, used by the Meta-Dropout reference).
    """

    def __init__(self, channels: int, eps: float = 1e-5, explicit: bool = False, scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.explicit = explicit

    def forward(self, x: Tensor) -> Tensor:
        if not self.explicit:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return (x if self.weight is None else x * self.weight.view(shape)) + self.bias.view(shape)


def use_vmap_safe_layers(model: nn.Module) -> None:
    """Switch every batch norm of ``model`` to explicit mean/variance ops (for ``vmap``)."""
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.explicit = True


class Transform(nn.Module):
    """T-net's meta-learned metric T placed after a layer's W (thesis Eq. 3.1): a square linear map
    on the layer's outputs, an n x n matrix for dense layers or a 1x1 convolution that keeps the
    channel count for conv layers, initialized to the identity. It is meta-only: the inner loop
    adapts W, and T shapes the metric of that adaptation (Eq. 3.4)."""

    def __init__(self, features: int, conv: bool = False):
        super().__init__()
        eye = torch.eye(features)
        self.weight = nn.Parameter(eye.view(features, features, 1, 1) if conv else eye)
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight) if self.conv else F.linear(x, self.weight)


def truncated_normal_(weight: Tensor, std: float) -> Tensor:
    """Normal(0, std) truncated at two standard deviations (TensorFlow's truncated_normal)."""
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
