"""Layers shared by the backbones, written for functional (``torch.func.functional_call``) use.

Batch norm and 2x2 max-pooling have hand-written autograd functions here. PyTorch's CPU kernels
for them are the slowest part of a Conv4 meta-iteration (on a 300 x 64 x 28 x 28 query activation:
max-pool forward 44 ms against 3 ms for a copy of the tensor, batch-norm backward 57 ms); the
versions below do the same arithmetic in a few passes of vectorized tensor ops. Their backward
passes are themselves written in differentiable ops, so second-order MAML differentiates through
them; the tests check them against ``F.batch_norm`` / ``F.max_pool2d`` and finite differences.
Neither works under ``torch.func.vmap``: :func:`use_vmap_safe_layers` switches a model to explicit
batch norm and ``F.max_pool2d`` (under ``vmap``, ``F.batch_norm`` gives wrong second-order gradients
without an error; explicit mean/variance is right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ------------------------------------------------------------------------------------ batch norm
class _BatchNormTrain(torch.autograd.Function):
    """y = (x - mean) * invstd * w + b with batch statistics over all dims but the channels."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if torch.is_grad_enabled():
            # Building a graph (second-order MAML): the statistics must be functions of x.
            mean = x.mean(dims)
            invstd = torch.rsqrt(x.var(dims, unbiased=False) + ctx.eps)
        n = x.numel() // x.shape[1]
        sum_dy = dy.sum(dims)
        sum_dy_xhat = ((dy * x).sum(dims) - mean * sum_dy) * invstd
        # dx = k * (dy - sum_dy / n - xhat * sum_dy_xhat / n), k = w * invstd, written as
        # a * dy + b * x + c with per-channel a, b, c: two passes over the activation.
        k = weight * invstd
        b = -k * invstd * sum_dy_xhat / n
        c = -k * sum_dy / n - b * mean
        dx = torch.addcmul(c.view(shape), x, b.view(shape))
        dx = torch.addcmul(dx, dy, k.view(shape))
        return dx, sum_dy_xhat, sum_dy, None


class BatchNorm(nn.Module):
    """Batch normalization with batch statistics at train *and* test time (MAML convention).

    Episodic meta-learning normalizes each task's batch by its own statistics (transductive, as in
    Finn et al. 2017); there are no running statistics. ``mode``: ``"fast"`` (the autograd function
    above), ``"native"`` (``F.batch_norm``) or ``"explicit"`` (mean/variance ops, for ``vmap``).
    """

    def __init__(self, channels: int, eps: float = 1e-5, mode: str = "fast"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fast":
            return _BatchNormTrain.apply(x, self.weight, self.bias, self.eps)
        if self.mode == "native":
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


# ------------------------------------------------------------------------------------- max-pool
class _MaxPool2x2(torch.autograd.Function):
    """2x2 max-pooling, stride 2, floor mode; ties go to the first element in scan order, as in
    ``F.max_pool2d``. The one-hot mask of the winners (bool, the input's size) is kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        ctx.input_hw = x.shape[-2:]
        x = x[..., :h, :w]
        a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        right_top, right_bottom, lower = b > a, d > c, bottom > top
        upper = ~lower
        mask = torch.stack(
            [torch.stack([upper & ~right_top, upper & right_top], -1), torch.stack([lower & ~right_bottom, lower & right_bottom], -1)],
            -3,
        )  # [..., h/2, 2, w/2, 2]
        ctx.save_for_backward(mask)
        return torch.maximum(top, bottom)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (mask,) = ctx.saved_tensors
        dx = (dy.unsqueeze(-1).unsqueeze(-3) * mask).flatten(-4, -3).flatten(-2, -1)
        height, width = ctx.input_hw
        if dx.shape[-2:] != (height, width):
            dx = F.pad(dx, (0, width - dx.shape[-1], 0, height - dx.shape[-2]))
        return dx


def max_pool2x2(x: Tensor) -> Tensor:
    return _MaxPool2x2.apply(x)


class MaxPool2x2(nn.Module):
    """2x2 max-pooling; ``fast=False`` uses ``F.max_pool2d`` (needed under ``vmap``)."""

    def __init__(self, fast: bool = True):
        super().__init__()
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2x2(x) if self.fast else F.max_pool2d(x, 2)


def use_vmap_safe_layers(model: nn.Module) -> None:
    """Switch every batch norm to explicit ops and every pool to ``F.max_pool2d``."""
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.mode = "explicit"
        elif isinstance(module, MaxPool2x2):
            module.fast = False
