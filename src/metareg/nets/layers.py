"""Layers shared by the backbones, written for functional (``torch.func.functional_call``) use, the
stacking of independent copies of a batch (batched Monte-Carlo samples), and the inner step a pass
belongs to (MAML++'s per-step batch norm)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_COPIES: ContextVar[int] = ContextVar("metareg_stacked_copies", default=1)
_STEP: ContextVar[int | None] = ContextVar("metareg_inner_step", default=None)


@contextmanager
def inner_step(step: int | None) -> Iterator[None]:
    """Inside the block the forward passes belong to inner step ``step`` (0-based): the support pass
    that step ``step`` differentiates and the query pass after it (MAML++'s indexing). Layers with
    per-step parameters or statistics (:class:`BatchNorm` with ``steps > 1``) use their row ``step``
    (the last row for steps beyond it); other layers ignore it. ``None``: no step (the default, which
    per-step layers read as their last step: the query pass after a full adaptation)."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def current_step() -> int | None:
    """The inner step of the current pass (:func:`inner_step`), or None outside one."""
    return _STEP.get()


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

    MAML++ (Antoniou et al. 2019), indexed by the pass's inner step (:func:`inner_step`; row
    ``min(step, steps - 1)``, the last row outside an inner step):

    * ``per_step_weights`` (BNWB): a weight and a bias per inner step, ``[steps, C]``;
    * ``per_step_stats`` (BNRS): running mean and (unbiased) variance per inner step, ``[steps, C]``
      buffers, updated with ``momentum`` from the batch statistics of training-mode passes only (the
      released code also updates them on evaluation passes and then restores a backup: the same
      result). As in the released code (``F.batch_norm(..., training=True)`` always), the
      normalization itself keeps using the batch's statistics: the running statistics are collected,
      not used. ``stats_at_test=True`` uses step k's running statistics to normalize in eval mode
      (meta-test, validation), which is what the paper describes the statistics for; it is off by
      default, since the released code (and its reported numbers) never does.
    """

    running_mean: Tensor  # buffers, registered with per_step_stats
    running_var: Tensor

    def __init__(
        self,
        channels: int,
        eps: float = 1e-5,
        explicit: bool = False,
        scale: bool = True,
        *,
        steps: int = 1,
        per_step_weights: bool = False,
        per_step_stats: bool = False,
        stats_at_test: bool = False,
        momentum: float = 0.1,
    ):
        super().__init__()
        if steps < 1:
            raise ValueError(f"per-step batch norm needs steps >= 1, got {steps}")
        if stats_at_test and not per_step_stats:
            raise ValueError("stats_at_test needs per_step_stats (there are no running statistics to use)")
        shape = (steps, channels) if per_step_weights else (channels,)
        self.weight = nn.Parameter(torch.ones(shape)) if scale else None
        self.bias = nn.Parameter(torch.zeros(shape))
        self.eps = eps
        self.explicit = explicit
        self.steps = steps
        self.per_step_weights = per_step_weights
        self.per_step_stats = per_step_stats
        self.stats_at_test = stats_at_test
        self.momentum = momentum
        if per_step_stats:
            self.register_buffer("running_mean", torch.zeros(steps, channels))
            self.register_buffer("running_var", torch.ones(steps, channels))

    def step_index(self) -> int:
        """The row of the per-step weights and statistics this pass uses."""
        step = current_step()
        return self.steps - 1 if step is None else min(step, self.steps - 1)

    def affine(self, k: int) -> tuple[Tensor | None, Tensor]:
        """(weight, bias) of step ``k`` (the shared ones without BNWB)."""
        if not self.per_step_weights:
            return self.weight, self.bias
        return (None if self.weight is None else self.weight[k]), self.bias[k]

    def forward(self, x: Tensor) -> Tensor:
        k = self.step_index()
        weight, bias = self.affine(k)
        if self.per_step_stats and self.stats_at_test and not self.training:
            shape = [1, -1] + [1] * (x.dim() - 2)
            x = (x - self.running_mean[k].view(shape)) * torch.rsqrt(self.running_var[k].view(shape) + self.eps)
            return (x if weight is None else x * weight.view(shape)) + bias.view(shape)
        count = copies()
        if self.per_step_stats and self.training:
            self._collect(x, k, count)
        if count > 1:
            return self._per_copy(x, count, weight, bias)
        if not self.explicit:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        dims = [0, *list(range(2, x.dim()))]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return (x if weight is None else x * weight.view(shape)) + bias.view(shape)

    @torch.no_grad()
    def _collect(self, x: Tensor, k: int, count: int) -> None:
        """BNRS: move step ``k``'s running statistics toward this batch's (for S stacked copies, the
        average of the copies' statistics, one update: S sequential passes would make S updates)."""
        folded = x.detach().reshape(count, x.shape[0] // count, *x.shape[1:]).transpose(1, 2)
        folded = folded.reshape(count, x.shape[1], -1)  # [S, C, N*H*W]
        mean, var = folded.mean(-1).mean(0), folded.var(-1, unbiased=True).mean(0)
        self.running_mean[k].mul_(1 - self.momentum).add_(self.momentum * mean)
        self.running_var[k].mul_(1 - self.momentum).add_(self.momentum * var)

    def _per_copy(self, x: Tensor, count: int, weight: Tensor | None, bias: Tensor) -> Tensor:
        n, c = x.shape[0] // count, x.shape[1]
        rest = x.shape[2:]
        folded = x.reshape(count, n, c, *rest).transpose(0, 1).reshape(n, count * c, *rest)
        weight = None if weight is None else weight.repeat(count)
        if self.explicit:
            dims = [0, *list(range(2, folded.dim()))]
            mean, var = folded.mean(dims, keepdim=True), folded.var(dims, unbiased=False, keepdim=True)
            shape = [1, -1] + [1] * (folded.dim() - 2)
            out = (folded - mean) * torch.rsqrt(var + self.eps)
            out = (out if weight is None else out * weight.view(shape)) + bias.repeat(count).view(shape)
        else:
            out = F.batch_norm(folded, None, None, weight, bias.repeat(count), training=True, eps=self.eps)
        return out.reshape(n, count, c, *rest).transpose(0, 1).reshape(x.shape)

    def extra_repr(self) -> str:
        per_step = [name for name in ("per_step_weights", "per_step_stats", "stats_at_test") if getattr(self, name)]
        return f"{self.bias.shape[-1]}, scale={self.weight is not None}" + (
            f", steps={self.steps}, " + ", ".join(per_step) if per_step else ""
        )


def tracks_running_statistics(model: nn.Module) -> bool:
    """Whether a layer of ``model`` updates running statistics in its training passes (MAML++'s
    per-step statistics): such in-place updates cannot run under ``vmap``."""
    return any(isinstance(m, BatchNorm) and m.per_step_stats for m in model.modules())


def episodic_norm(
    *,
    scale: bool = True,
    norm_steps: int = 1,
    per_step_weights: bool = False,
    per_step_stats: bool = False,
    stats_at_test: bool = False,
):
    """The episodic batch norm a backbone builds for each of its norm layers: ``make(channels)``.
    ``norm_steps`` rows for MAML++'s per-step weights (BNWB) and statistics (BNRS), see :class:`BatchNorm`."""

    def make(channels: int) -> BatchNorm:
        return BatchNorm(
            channels,
            scale=scale,
            steps=norm_steps,
            per_step_weights=per_step_weights,
            per_step_stats=per_step_stats,
            stats_at_test=stats_at_test,
        )

    return make


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


def bias_of(layer: nn.Conv2d | nn.Linear) -> Tensor:
    """The bias of ``layer``, built with one (torch types a convolution's bias as optional)."""
    if layer.bias is None:
        raise ValueError(f"this {type(layer).__name__} layer was built without a bias")
    return layer.bias
