"""Mixed precision for meta-training (``train.precision``): ``bf16`` runs the inner and the outer
passes under ``torch.autocast`` with bfloat16, ``float32`` (the default) runs them as they are.

Under bf16 autocast the matrix products and convolutions run in bfloat16 while the weights stay
float32 ("master weights"): autocast casts them per operation, so every gradient reaching a weight
(the inner steps' gradients, hence the fast weights, and the meta-gradient accumulated over the
tasks in ``.grad``) is float32; the losses (cross-entropy, ``log_softmax``) run in float32 as
autocast's lists prescribe. bfloat16 has float32's exponent range, so no loss scaling is needed.
Backward passes run outside autocast (each op's backward uses its forward's dtypes). The meta-test
(adaptation and query scores outside meta-training) stays in float32.

Off by default: bfloat16 keeps 8 bits of mantissa, and whether the second-order meta-gradient
stays within a useful tolerance of the float32 one on a real backbone must first be measured on a
GPU (issue 25); on a CPU bf16 is correct but rarely faster.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ..errors import ConfigError

PRECISIONS = ("float32", "bf16")


def check_precision(precision: str, dtype: torch.dtype | None = None) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be float32 or bf16, got {precision!r}")
    if precision == "bf16" and dtype not in (None, torch.float32):
        raise ConfigError(f"train.precision=bf16 keeps float32 master weights: use dtype float32, not {dtype}")


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The context the meta-training passes run in: bf16 autocast on ``device_type``, or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()
