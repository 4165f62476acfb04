"""Mean and 95% confidence interval over episodes, and paired comparisons on the same episodes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Z95 = 1.96


@dataclass(frozen=True)
class Estimate:
    """A mean with the half-width of its 95% confidence interval (1.96 x std / sqrt(n))."""

    mean: float
    ci95: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        if math.isnan(self.ci95) and self.n < 2:
            return f"{self.mean * scale:.{digits}f} +- n/a (one value: no interval)"
        return f"{self.mean * scale:.{digits}f} +- {self.ci95 * scale:.{digits}f}"


def mean_ci(values: Tensor | list[float]) -> Estimate:
    """The mean of ``values`` with the half-width of its normal-approximation 95% confidence
    interval, 1.96 x (sample standard deviation, n - 1) / sqrt(n): how the papers report accuracy
    over 1000 test episodes.

    Args:
        values: one number per episode (or image).

    Returns:
        An ``Estimate`` with ``mean``, ``ci95`` (NaN for a single value) and ``n``;
        ``format(scale)`` prints ``"mean +- ci95"``.

    Raises:
        ValueError: no values.

    Examples:
        ```python
        import metareg

        estimate = metareg.mean_ci([0.8, 0.9, 0.85, 0.95])
        print(estimate.format(100))   # 87.50 +- 6.33
        ```
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("no values")
    std = v.std(unbiased=True).item() if n > 1 else math.nan
    return Estimate(v.mean().item(), Z95 * std / math.sqrt(n), n)


def paired_difference(a: Tensor | list[float], b: Tensor | list[float]) -> Estimate:
    """The mean of ``a - b`` over the same episodes with its own 95% confidence interval: the
    comparison of two models that cancels the episodes' difficulty (``metareg compare``).

    Args:
        a: per-episode scores of model A.
        b: per-episode scores of model B on the same episodes, in the same order.

    Returns:
        The ``Estimate`` of A - B (see :func:`mean_ci`).

    Raises:
        ValueError: ``a`` and ``b`` hold different numbers of episodes.

    Examples:
        ```python
        import metareg

        print(metareg.paired_difference([0.9, 0.8, 0.7], [0.85, 0.8, 0.6]).format(100))   # 5.00 +- 5.66
        ```
    """
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same episodes: {a.numel()} vs {b.numel()} values")
    return mean_ci(a - b)
