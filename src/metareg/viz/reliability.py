"""Reliability diagrams (MetaPerturb Figure 6(d)) from the ``test.json`` of transfer runs or episodic
runs (over all query predictions): accuracy against confidence in equal confidence bins, the
diagonal being perfect calibration; the legend gives ECE."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..runfolder import read_result
from .backend import pyplot


def _result(run: str | Path) -> dict:
    path = Path(run) / "test.json" if Path(run).is_dir() else Path(run)
    result = read_result(path)
    if not isinstance(result.get("reliability"), dict) or result.get("ece") is None:
        raise ConfigError(
            f"{path} is not a test result with calibration (metareg test of a classification run, or metareg perturb "
            "transfer)"
        )
    return result


def plot_reliability(runs: list[str | Path], out: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    for run in runs:
        result = _result(run)
        bins = result["reliability"]
        points = [(c, a) for n, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"]) if n > 0]
        ax.plot(*zip(*points), marker="o", label=f"{Path(run).name} (ECE {result['ece']:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("reliability diagram")
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
