"""Calibration of predicted probabilities: expected calibration error and the reliability diagram's
bins (Naeini et al. 2015, as in MetaPerturb's Figure 6(d)), and the negative log-likelihood.

The confidence of a prediction is its top probability; predictions are grouped into ``bins`` equal
bins of confidence in [0, 1]; ECE = sum_b (n_b / n) |accuracy_b - confidence_b|. The bins' totals
(count, summed confidence, summed correctness) add up over batches, so a meta-test of many episodes
computes ECE over all its query predictions without keeping them.
"""

from __future__ import annotations

import torch
from torch import Tensor

BINS = 15


def bin_totals(probabilities: Tensor, labels: Tensor, bins: int = BINS) -> Tensor:
    """``[3, bins]`` float64: per confidence bin, the number of predictions, their summed
    confidence and their summed correctness."""
    confidence, predicted = probabilities.detach().max(dim=-1)
    confidence, predicted, labels = confidence.flatten(), predicted.flatten(), labels.flatten()
    which = torch.clamp(
        torch.nan_to_num(confidence * bins).long(), 0, bins - 1
    )  # (a diverged model is refused by the caller)
    totals = torch.zeros(3, bins, dtype=torch.float64, device=probabilities.device)
    totals[0].index_add_(0, which, torch.ones_like(confidence, dtype=torch.float64))
    totals[1].index_add_(0, which, confidence.double())
    totals[2].index_add_(0, which, (predicted == labels).double())
    return totals


def reliability_from_totals(totals: Tensor) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy (bins with no prediction: count 0 and NaNs)."""
    count, confidence, correct = totals.cpu()
    return {
        "count": count.tolist(),
        "confidence": (confidence / count).tolist(),
        "accuracy": (correct / count).tolist(),
    }


def ece_from_totals(totals: Tensor) -> float:
    count, confidence, correct = totals.cpu()
    used = count > 0
    return float(((confidence[used] - correct[used]).abs()).sum() / count.sum())


def reliability(probabilities: Tensor, labels: Tensor, bins: int = BINS) -> dict[str, list[float]]:
    return reliability_from_totals(bin_totals(probabilities, labels, bins))


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = BINS) -> float:
    return ece_from_totals(bin_totals(probabilities, labels, bins))
