"""Calibration of predicted probabilities: expected calibration error and the reliability diagram's
bins (Naeini et al. 2015, as in MetaPerturb's Figure 6(d)).

The confidence of a prediction is its top probability; predictions are grouped into ``bins`` equal
bins of confidence in [0, 1]; ECE = sum_b (n_b / n) |accuracy_b - confidence_b|.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reliability(probabilities: Tensor, labels: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy (bins with no prediction have count 0 and NaNs)."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    total_confidence = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence.double())
    total_correct = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    return {"count": count.tolist(), "confidence": (total_confidence / count).tolist(), "accuracy": (total_correct / count).tolist()}


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = 15) -> float:
    table = reliability(probabilities, labels, bins)
    n = sum(table["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(table["count"], table["accuracy"], table["confidence"]) if c > 0)
