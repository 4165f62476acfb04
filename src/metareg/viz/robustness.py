"""Robust accuracy against the attack size, one curve per run (Meta-Dropout Figure 5, MetaPerturb
Figure 6(a-c)), from numbers computed by :func:`metareg.runs.robustness.robust_accuracy`."""

from __future__ import annotations

from pathlib import Path

from .backend import pyplot


def plot_robustness(curves: dict[str, tuple[list[float], list[float]]], attack: str, out: str | Path) -> Path:
    """``curves``: per run label, (epsilons, accuracies in [0, 1])."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    for label, (epsilons, accuracies) in curves.items():
        ax.plot(epsilons, [100 * a for a in accuracies], marker="o", label=label)
    ax.set_xlabel(f"attack size epsilon ({attack})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("robust accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
