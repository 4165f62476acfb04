"""Learning curves from run folders' ``log.csv``: query loss, query score and validation score."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError
from .backend import pyplot


def read_log(run: str | Path) -> dict[str, list[float]]:
    path = Path(run) / "log.csv" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ConfigError(f"no training log at {path}")
    columns: dict[str, list[float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                columns.setdefault(key, []).append(float(value) if value not in ("", None) else float("nan"))
    return columns


def plot_curves(runs: list[str | Path], out: str | Path) -> Path:
    """One figure, three panels (loss, score, validation score) with a line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        log = read_log(run)
        label = Path(run).name
        axes[0].plot(log["step"], log["loss"], label=label)
        axes[1].plot(log["step"], log["score"], label=label)
        val = [(s, v, c) for s, v, c in zip(log["step"], log["val_score"], log["val_ci95"]) if v == v]
        if val:
            steps, means, cis = zip(*val)
            axes[2].errorbar(steps, means, yerr=cis, capsize=2, label=label)
    for ax, title in zip(axes, ("query loss (meta-training)", "query score (meta-training)", "validation score +- 95% CI")):
        ax.set_title(title)
        ax.set_xlabel("meta-iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
