"""Dropout-style multiplicative noise with mean 1 and variance p / (1 - p), shared by DropGrad (on
gradients) and the dropout perturbations (on features)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError


def check_dropout(what: str, p: float, kind: str) -> None:
    """A clear error for a rate outside [0, 1) or an unknown noise kind."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{what} rate p must be in [0, 1), got {p}")
    if kind not in ("binary", "gaussian"):
        raise ConfigError(f"{what} kind must be binary or gaussian, got {kind!r}")


def dropout_noise(
    shape: torch.Size | tuple[int, ...], p: float, kind: Literal["binary", "gaussian"], like: Tensor
) -> Tensor:
    """binary: Bernoulli(1 - p) / (1 - p); gaussian: N(1, p / (1 - p)) (DropGrad Eq. 5-6, Gaussian
    dropout of Srivastava et al.), with ``like``'s dtype and device."""
    if kind == "binary":
        return torch.bernoulli(torch.full(shape, 1.0 - p, dtype=like.dtype, device=like.device)) / (1.0 - p)
    return 1.0 + torch.randn(shape, dtype=like.dtype, device=like.device) * (p / (1.0 - p)) ** 0.5
