"""Layers shared by the backbones, written for functional (``torch.func.functional_call``) use, and
the stacking of independent copies of a batch (batched Monte-Carlo samples)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_COPIES: ContextVar[int] = ContextVar("metareg_stacked_copies", default=1)


@contextmanager
def stacked_copies(count: int) -> Iterator[None]:
    """Inside the block a batch holds ``count`` independent copies of a smaller batch, stacked on
    the batch dimension (copy-major): every layer that computes a batch statistic (batch norm,
    MetaPerturb's scale) computes it per copy, and every perturbation draws its own noise per copy,
    so one pass equals ``count`` separate passes (the inner loop's S Monte-Carlo samples, batched)."""
    token = _COPIES.set(count)
    try:
        yield
    finally:
        _COPIES.reset(token)


def copies() -> int:
    """How many independent copies the current batch stacks (1 outside :func:`stacked_copies`)."""
    return _COPIES.get()


class BatchNorm(nn.Module):
    """Batch normalization with batch statistics at train *and* test time (MAML convention).

    Episodic meta-learning normalizes each task's batch by its own statistics (transductive, as in
    Finn et al. 2017); there are no running statistics. ``explicit=True`` writes the normalization
    as explicit mean/variance ops, which is what ``torch.func.vmap`` needs: under ``vmap``,
    ``F.batch_norm`` silently gives wrong second-order gradients. ``scale=False``: a shift only, no
    learned scale (TensorFlow's ``batch_norm`` default, used by the Meta-Dropout reference). Inside
    :func:`stacked_copies` each copy is normalized by its own statistics: the copies are moved from
    the batch to the channel dimension (``[S*N, C, ...] -> [N, S*C, ...]``), so one native batch norm
    with the affine parameters repeated S times computes exactly the S separate normalizations.
    """

    def __init__(self, channels: int, eps: float = 1e-5, explicit: bool = False, scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.explicit = explicit

    def forward(self, x: Tensor) -> Tensor:
        count = copies()
        if count > 1:
            return self._per_copy(x, count)
        if not self.explicit:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0, *list(range(2, x.dim()))]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return (x if self.weight is None else x * self.weight.view(shape)) + self.bias.view(shape)

    def _per_copy(self, x: Tensor, count: int) -> Tensor:
        n, c = x.shape[0] // count, x.shape[1]
        rest = x.shape[2:]
        folded = x.reshape(count, n, c, *rest).transpose(0, 1).reshape(n, count * c, *rest)
        weight = None if self.weight is None else self.weight.repeat(count)
        if self.explicit:
            dims = [0, *list(range(2, folded.dim()))]
            mean, var = folded.mean(dims, keepdim=True), folded.var(dims, unbiased=False, keepdim=True)
            shape = [1, -1] + [1] * (folded.dim() - 2)
            out = (folded - mean) * torch.rsqrt(var + self.eps)
            out = (out if weight is None else out * weight.view(shape)) + self.bias.repeat(count).view(shape)
        else:
            out = F.batch_norm(folded, None, None, weight, self.bias.repeat(count), training=True, eps=self.eps)
        return out.reshape(n, count, c, *rest).transpose(0, 1).reshape(x.shape)


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


def drop_blocks(x: Tensor, p: float, block_size: int) -> Tensor:
    """DropBlock's mask applied to ``x`` (``[N, C, H, W]``, square maps; Ghiasi, Lin & Le 2018, Algorithm
    1): block centers drawn with probability ``gamma = p / b^2 * H^2 / (H - b + 1)^2`` where a whole
    ``b x b`` block fits, grown into blocks by a max-pool, and the kept units rescaled by (units / kept
    units), so that about a fraction ``p`` of the units is dropped. Where the map is smaller than the
    block, the block is the map's side. Shared by the ``dropblock`` perturbation and ResNet-12's blocks."""
    if p == 0.0:
        return x
    size = x.shape[-1]
    block = min(block_size, size)
    gamma = p / block**2 * size**2 / (size - block + 1) ** 2
    valid = size - block + 1
    centers = torch.bernoulli(torch.full((*x.shape[:2], valid, valid), min(gamma, 1.0), dtype=x.dtype, device=x.device))
    centers = F.pad(centers, [block // 2, (block - 1) // 2] * 2)
    dropped = F.max_pool2d(centers, block, stride=1, padding=block // 2)[..., :size, :size] if block > 1 else centers
    keep = 1 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


def truncated_normal_(weight: Tensor, std: float) -> Tensor:
    """Normal(0, std) truncated at two standard deviations (TensorFlow's truncated_normal)."""
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
