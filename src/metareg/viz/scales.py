"""MetaPerturb's Figure 7: the learned channel scale s at every perturbed block of trained networks.

For each transfer run the scale of block l and channel c is computed from the running statistics
the network uses at test time (``MetaPerturb.running_scales``). One heatmap per run (blocks on the
x axis, channels on the y axis; narrower blocks leave blank rows), and one panel with each run's
mean and spread of s per block, so data sets can be compared the way the paper does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backend import pyplot


def plot_scales(found: list[tuple[str, list[str], list[torch.Tensor]]], out: str | Path) -> Path:
    """``found``: per run, (label, block names, s per block), e.g. from
    :func:`metareg.runs.transfer.run_scales`."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(found) + 1, figsize=(3.6 * len(found) + 4.5, 3.8), squeeze=False, layout="constrained"
    )
    for ax, (label, _points, scales) in zip(axes[0], found):
        rows = max(len(s) for s in scales)
        grid = torch.full((rows, len(scales)), float("nan"))
        for j, s in enumerate(scales):
            grid[: len(s), j] = s
        image = ax.imshow(
            grid.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis", interpolation="nearest"
        )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("channel")
    fig.colorbar(image, ax=axes[0][: len(found)].tolist(), label="scale s", shrink=0.9)
    summary = axes[0][-1]
    for label, _points, scales in found:
        means = torch.stack([s.mean() for s in scales])
        spread = torch.stack([s.std() if len(s) > 1 else s.new_zeros(()) for s in scales])
        x = torch.arange(len(scales))
        summary.plot(x, means, marker="o", label=label.replace("\n", ": "))
        summary.fill_between(x, means - spread, means + spread, alpha=0.2)
    summary.set_ylim(0, 1)
    summary.set_xlabel("block")
    summary.set_title("mean +- std of s over channels", fontsize=9)
    summary.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18))
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
