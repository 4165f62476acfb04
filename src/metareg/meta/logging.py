"""Training logs a user can plot: a CSV file (and TensorBoard events when it is installed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files import atomic_open

COLUMNS = ["step", "loss", "score", "val_score", "val_ci95", "seconds", "tasks_per_s"]


class MetricLog:
    """Append-only CSV of training metrics; on resume, rows past the checkpoint are dropped."""

    def __init__(
        self, path: Path, resume_step: int | None = None, tensorboard: bool = True, columns: list[str] = COLUMNS
    ):
        self.path = path
        self.columns = columns
        if resume_step is None or not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(columns)
        else:  # the rows up to the checkpoint (rows that cannot be read are not steps), rewritten atomically
            try:
                with path.open(newline="", encoding="utf-8", errors="replace") as f:
                    rows = [r for r in csv.DictReader(f) if str(r.get("step") or "").isdigit()]
            except csv.Error as err:
                raise CheckpointError(f"{path} is damaged ({err}): move it away to continue the run") from None
            with atomic_open(path, "w") as f:
                writer = csv.DictWriter(f, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({k: r.get(k) or "" for k in columns} for r in rows if int(r["step"]) <= resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: _fmt(row.get(k)) for k in self.columns})
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
