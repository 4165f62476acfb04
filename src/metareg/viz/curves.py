"""Learning curves from run folders' ``log.csv``: query loss, query score and validation score."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import CheckpointError, ConfigError, one_line
from .backend import pyplot


def read_log(run: str | Path) -> dict[str, list[float]]:
    path = Path(run) / "log.csv" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ConfigError(f"no training log at {path}")
    columns: dict[str, list[float]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if not isinstance(key, str) or not isinstance(value, (str, type(None))):
                        raise ValueError("a row has more fields than the header")
                    columns.setdefault(key, []).append(float(value) if value not in ("", None) else float("nan"))
    except (ValueError, csv.Error, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged ({one_line(err, 120)}): not a training log metareg wrote") from None
    return columns


# (title, column, column of its 95% CI) per panel, for episodic logs and for ordinary training's logs
PANELS = {
    "score": (
        ("query loss (meta-training)", "loss", None),
        ("query score (meta-training)", "score", None),
        ("validation score +- 95% CI", "val_score", "val_ci95"),
    ),
    "accuracy": (
        ("training loss", "loss", None),
        ("training accuracy (perturbed batches)", "accuracy", None),
        ("test accuracy", "test_accuracy", None),
    ),
}


def block_diagnostics(log: dict[str, list[float]]) -> list[str]:
    """MetaPerturb's per-block columns of a transfer log: mean noise ``z<i>`` and mean scale ``s<i>``."""
    return sorted(k for k in log if len(k) > 1 and k[0] in "zs" and k[1:].isdigit())


def plot_curves(runs: list[str | Path], out: str | Path) -> Path:
    """One figure, three panels with a line per run: loss, score and validation score of episodic
    runs; loss, training accuracy and test accuracy (when ``eval_every`` was set) of transfer runs;
    a fourth panel with MetaPerturb's mean noise z (dashed) and scale s (solid) per block when a
    run logged them (how strongly the regularizer acts)."""
    plt = pyplot()
    logs = [read_log(run) for run in runs]
    diagnostics = any(block_diagnostics(log) for log in logs)
    fig, axes = plt.subplots(1, 4 if diagnostics else 3, figsize=(17 if diagnostics else 13, 3.6))
    titles = []
    for run, log in zip(runs, logs):
        label = Path(run).name
        panels = PANELS["score" if "score" in log else "accuracy"]
        titles = [title for title, _, _ in panels]
        for ax, (_, column, ci) in zip(axes, panels):
            zeros = [0.0] * len(log["step"])
            points = [
                (s, v, c)
                for s, v, c in zip(log["step"], log.get(column, []), zeros if ci is None else log.get(ci, zeros))
                if v == v
            ]
            if points:
                steps, values, cis = zip(*points)
                ax.errorbar(steps, values, yerr=cis if ci else None, capsize=2 if ci else 0, label=label)
        for column in block_diagnostics(log):
            axes[3].plot(log["step"], log[column], "--" if column[0] == "z" else "-", label=f"{label} {column}")
    if diagnostics:
        titles = [*titles, "MetaPerturb per block: z (dashed), s (solid)"]
        axes[3].legend(fontsize=6, ncol=2)
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
