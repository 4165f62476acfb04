"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from metareg.data.tasks import TaskBatch
from metareg.inner import build_inner_rule
from metareg.meta import BilevelLearner, select_fast
from metareg.nets import MLP, ConvNet


def random_image_batch(tasks=2, way=3, shot=1, query=2, channels=1, size=8, dtype=torch.float64, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(tasks, n, channels, size, size, generator=g, dtype=dtype)

    def labels(k):
        return torch.stack([torch.randperm(way, generator=g).repeat_interleave(k) for _ in range(tasks)])

    return TaskBatch(images(way * shot), labels(shot), images(way * query), labels(query))


def random_regression_batch(tasks=3, shot=5, query=4, dtype=torch.float64, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, shot + query, 1, generator=g, dtype=dtype) * 10 - 5
    amp = torch.rand(tasks, 1, 1, generator=g, dtype=dtype) * 4 + 0.5
    y = amp * torch.sin(x)
    return TaskBatch(x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:])


def tiny_conv(way=3, channels=4, size=8, depth=2, dtype=torch.float64, seed=0, **kw) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(way, 1, size, channels=channels, depth=depth, **kw).to(dtype)


def learner_for(model, *, lr=0.1, steps=2, step="sgd", task="classification", transforms=None, **kw) -> BilevelLearner:
    params = dict(model.named_parameters())
    fast = {n: params[n] for n in select_fast(model, kw.get("fast", ["*"]))}
    rule = build_inner_rule(fast, step=step, lr=lr, steps=steps, transforms=transforms, groups=model.layer_groups()).to(
        next(model.parameters()).dtype
    )
    return BilevelLearner(model, rule, task=task, inner_steps=steps, **kw)


def tiny_mlp(hidden=(6, 6), dtype=torch.float64, seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 1, hidden).to(dtype)
