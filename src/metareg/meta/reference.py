"""A plain per-task MAML loop, written independently of the engine.

It is the yardstick of ``metareg bench`` and of the tests: each task adapted with
``torch.autograd.grad(create_graph=True)`` on explicit weight dictionaries and plain ``torch.nn.functional``
calls (conv -> batch norm -> ReLU -> max-pool, as Finn et al. wrote it), its query loss differentiated
right away. The engine must give the same meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.tasks import TaskBatch

Params = dict[str, Tensor]


def conv_forward(params: Params, x: Tensor, depth: int = 4, strided: bool = False) -> Tensor:
    """Conv4 / ConvN of Finn et al. on the parameter names of ``metareg.nets.ConvNet``."""
    for i in range(depth):
        p = f"blocks.{i}."
        x = F.conv2d(x, params[p + "conv.weight"], params[p + "conv.bias"], stride=2 if strided else 1, padding=1)
        x = F.batch_norm(x, None, None, params[p + "norm.weight"], params[p + "norm.bias"], training=True)
        x = F.relu(x)
        if not strided:
            x = F.max_pool2d(x, 2)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def resnet12_forward(params: Params, x: Tensor, blocks: int = 4, avg_pool: bool = False) -> Tensor:
    """ResNet-12 (MetaOptNet's block: three conv-BN with LeakyReLU(0.1) after the first two, a 1x1
    conv-BN shortcut, LeakyReLU(0.1) and a 2x2 max-pool after the sum) on the parameter names of
    ``metareg.nets.ResNet12``, batch statistics, no dropout."""

    def bn(h: Tensor, name: str) -> Tensor:
        return F.batch_norm(h, None, None, params[name + ".weight"], params[name + ".bias"], training=True)

    for i in range(blocks):
        p = f"blocks.{i}."
        h = x
        for j in (1, 2, 3):
            h = bn(F.conv2d(h, params[f"{p}conv{j}.weight"], padding=1), f"{p}bn{j}")
            if j < 3:
                h = F.leaky_relu(h, 0.1)
        h = h + bn(F.conv2d(x, params[p + "shortcut_conv.weight"]), p + "shortcut_bn")
        x = F.max_pool2d(F.leaky_relu(h, 0.1), 2)
    x = x.mean((-2, -1)) if avg_pool else x.flatten(1)
    return F.linear(x, params["head.weight"], params["head.bias"])


def mlp_forward(params: Params, x: Tensor, depth: int = 2) -> Tensor:
    """The 1-40-40-1 ReLU regressor on the parameter names of ``metareg.nets.MLP``."""
    for i in range(depth):
        x = F.relu(F.linear(x, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]))
    return F.linear(x, params["head.weight"], params["head.bias"])


def reference_meta_gradient(
    params: Params,
    batch: TaskBatch,
    *,
    lr: float,
    steps: int,
    forward: Callable[[Params, Tensor], Tensor] = conv_forward,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    first_order: bool = False,
) -> tuple[Tensor, Params]:
    """Mean query loss over the batch and its gradient w.r.t. ``params`` (all of them fast)."""
    names = list(params)
    leaves = [params[n] for n in names]
    total = torch.zeros((), dtype=leaves[0].dtype)
    grads = [torch.zeros_like(p) for p in leaves]
    for i in range(batch.num_tasks):
        fast = leaves
        for _ in range(steps):
            inner = loss_fn(forward(dict(zip(names, fast)), batch.support_x[i]), batch.support_y[i])
            inner_grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [w - lr * gw for w, gw in zip(fast, inner_grads)]
        query = loss_fn(forward(dict(zip(names, fast)), batch.query_x[i]), batch.query_y[i]) / batch.num_tasks
        for acc, g in zip(grads, torch.autograd.grad(query, leaves)):
            acc += g
        total += query.detach()
    return total, dict(zip(names, grads))
