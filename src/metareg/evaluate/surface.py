"""Loss surfaces along filter-normalized random directions (Li, Xu, Taylor, Studer & Goldstein,
"Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018), for MetaPerturb's Figure 8.

Two random Gaussian directions d1, d2 in parameter space, each *filter-normalized*: every filter
(a convolution's output channel, a dense layer's row) of d is rescaled to the norm of the same
filter of the trained weights theta, so that the plot's scale does not depend on the weights'
scale. One-dimensional parameters (biases, batch norm) get no direction (Li et al.'s
"ignore biasbn" setting, the one their figures use). The surface is the loss at
theta + a d1 + b d2 over a grid of (a, b) in [-span, span]^2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Params = dict[str, Tensor]


def filter_normalized_direction(params: Params, generator: torch.Generator) -> Params:
    """A Gaussian direction shaped like ``params`` with every filter rescaled to the norm of the
    weights' filter; zero for one-dimensional parameters."""
    out = {}
    for name, p in params.items():
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        scale = p.detach().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)
        out[name] = d * scale.view(-1, *[1] * (p.dim() - 1))
    return out


@torch.no_grad()
def loss_surface(
    loss_at: Callable[[Params], float],
    params: Params,
    directions: tuple[Params, Params],
    *,
    span: float = 1.0,
    points: int = 11,
) -> tuple[Tensor, Tensor]:
    """``(coords, losses)``: the grid coordinates ``[points]`` and ``losses[i, j] = loss_at(theta +
    coords[j] d1 + coords[i] d2)``."""
    coords = torch.linspace(-span, span, points, dtype=torch.float64)
    d1, d2 = directions
    grid = torch.empty(points, points, dtype=torch.float64)
    for i, b in enumerate(coords.tolist()):
        for j, a in enumerate(coords.tolist()):
            grid[i, j] = loss_at({n: p + a * d1[n] + b * d2[n] for n, p in params.items()})
    return coords, grid
