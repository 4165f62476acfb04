"""MetaPerturb's Figure 8: the training loss surface of trained networks, one contour panel per run
(the same color levels in every panel, so flatness compares across runs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .backend import pyplot


def plot_loss_surfaces(surfaces: list[dict[str, Any]], out: str | Path) -> Path:
    """``surfaces``: per run ``{"label", "coords", "loss"}`` (from :func:`metareg.runs.surface.run_loss_surface`)."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(surfaces), figsize=(3.8 * len(surfaces) + 0.8, 3.6), squeeze=False, layout="constrained"
    )
    logs = [torch.tensor(s["loss"], dtype=torch.float64).clamp_min(1e-12).log10() for s in surfaces]
    low = min(float(g.min()) for g in logs)
    high = max(float(g.max()) for g in logs)
    levels = torch.linspace(low, high if high > low else low + 1.0, 15).tolist()
    for ax, surface, grid in zip(axes[0], surfaces, logs):
        coords = surface["coords"]
        contour = ax.contourf(coords, coords, grid.numpy(), levels=levels, cmap="viridis")
        ax.contour(coords, coords, grid.numpy(), levels=levels, colors="white", linewidths=0.3)
        ax.plot([0], [0], marker="*", color="red")
        centre = surface["loss"][len(coords) // 2][len(coords) // 2]
        ax.set_title(f"{surface['label']}\nloss at the weights {centre:.3g}", fontsize=9)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_aspect("equal")
    fig.colorbar(contour, ax=axes[0].tolist(), label="log10 training loss", shrink=0.9)
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def flatness(surface: dict[str, Any]) -> float:
    """The mean increase of the loss over the grid relative to the centre: a one-number summary
    (larger: sharper)."""
    grid = torch.tensor(surface["loss"], dtype=torch.float64)
    centre = grid[grid.shape[0] // 2, grid.shape[1] // 2]
    return float((grid - centre).mean()) if math.isfinite(float(centre)) else float("nan")
