"""``metareg plot features``: a layer's activations and their perturbed versions for a few images
(Meta-Dropout, Appendix C, Figures 6-7).

For each of a few support images of a test episode, with the weights adapted to that episode:
the input, the chosen channel of block ``layer``'s output with the deterministic perturbation
(a = mu, what the query set sees) and with sampled noise (what the inner loop trains on), several
draws. Every perturbed draw shares the colour scale of the deterministic one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .backend import pyplot


def plot_features(
    view, out: str | Path, *, layer: int = 0, channel: int | None = None, images: int = 4, samples: int = 4
) -> Path:
    """``view``: one test episode of a trained run, adapted (:func:`metareg.runs.task_view.adapted_task`)."""
    plt = pyplot()
    blocks = getattr(view.learner.model, "blocks", None)
    if blocks is None or not 0 <= layer < len(blocks):
        raise ConfigError(f"--layer must name a conv block, 0..{len(blocks or []) - 1}")
    x = view.task.support_x[0]
    name = f"blocks.{layer}"
    clean = view.capture(x, name, sample=False)
    torch.manual_seed(1)
    noisy = [view.capture(x, name, sample=True) for _ in range(samples)]
    if channel is None:  # the channel most active on these images
        channel = int(clean.mean((0, 2, 3)).argmax())
    if not 0 <= channel < clean.shape[1]:
        raise ConfigError(f"--channel must be in 0..{clean.shape[1] - 1}")
    rows = min(images, x.shape[0])
    fig, axes = plt.subplots(rows, 2 + samples, figsize=(1.6 * (2 + samples), 1.7 * rows), squeeze=False)
    for r in range(rows):
        image = x[r].permute(1, 2, 0).squeeze(-1).float().cpu().numpy()
        axes[r][0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        top = float(clean[r, channel].max()) or 1.0
        axes[r][1].imshow(clean[r, channel].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=top)
        for s in range(samples):
            axes[r][2 + s].imshow(noisy[s][r, channel].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=top)
    for c, title in enumerate(["input", "a = mu", *[f"sample {s + 1}" for s in range(samples)]]):
        axes[0][c].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{view.name}: block {layer}, channel {channel} ({view.config.perturb.name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
