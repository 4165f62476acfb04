"""``metareg plot loss-surface RUN ...``: the training loss surface of transfer runs (MetaPerturb
Figure 8: Base, Manifold Mixup and MetaPerturb networks on one target).

For each run: its trained network (eval mode: batch norm and MetaPerturb's scale on their running
statistics, as the network is used), a fixed batch of its own training images (``images`` of them,
chosen with ``seed``), and the cross-entropy at theta + a d1 + b d2 over a grid
(:mod:`metareg.evaluate.surface`; filter-normalized directions drawn with ``seed``). Perturbations
that sample at test time (MetaPerturb) draw the same noise at every grid point (the generator is
seeded before each), so the surface is a smooth function of (a, b). The perturbation's own
parameters (phi) are fixed: directions move the network's weights only. Results are cached in the
run folder (``loss-surface.json``, keyed by the settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..build import IMAGE_CHANNELS
from ..checkpoint import write_json_atomic
from ..data.augment import normalize, to_channels
from ..errors import ConfigError
from ..evaluate.surface import filter_normalized_direction, loss_surface
from ..fewshot import load_transfer_model
from ..nets.slots import perturbation_parameter_names
from ..seeds import seeded
from .transfer import samples_at_test, target_data

SURFACE = "loss-surface.json"


def run_loss_surface(
    run: str | Path, *, points: int = 11, span: float = 1.0, images: int = 256, seed: int = 0
) -> dict[str, Any]:
    """``{"label", "coords", "loss", "settings"}`` of transfer run ``run`` (computed, or read from its cache)."""
    run = Path(run)
    settings = {"points": points, "span": span, "images": images, "seed": seed}
    cached = run / SURFACE
    if cached.is_file():
        stored = json.loads(cached.read_text())
        if stored.get("settings") == settings:
            return stored
    if points < 2 or span <= 0 or images < 1:
        raise ConfigError(f"a loss surface needs >= 2 points per axis, a positive span and >= 1 image, got {settings}")
    config, model = load_transfer_model(run)
    train, _ = target_data(config.data)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:images]
    x = normalize(to_channels(train.images[chosen], IMAGE_CHANNELS))
    y = train.labels[chosen]
    fixed = set(perturbation_parameter_names(model))
    params = {n: p.detach() for n, p in model.named_parameters() if n not in fixed}
    rest = {n: p.detach() for n, p in model.named_parameters() if n in fixed} | dict(model.named_buffers())
    generator = torch.Generator().manual_seed(seed)
    directions = (filter_normalized_direction(params, generator), filter_normalized_direction(params, generator))
    sample = samples_at_test(config)

    def loss_at(moved: dict[str, torch.Tensor]) -> float:
        with seeded(seed):
            out = functional_call(model, moved | rest, (x,), {"sample": sample})
        return F.cross_entropy(out, y).item()

    coords, grid = loss_surface(loss_at, params, directions, span=span, points=points)
    what = {"none": "Base"}.get(config.perturb.name, config.perturb.name)
    result = {
        "label": f"{run.name} ({what})",
        "coords": coords.tolist(),
        "loss": grid.tolist(),
        "settings": settings,
        "data": config.data.name,
        "backbone": config.model.backbone,
    }
    write_json_atomic(cached, result)
    return result
