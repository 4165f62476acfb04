"""Mixed precision for meta-training (``train.precision``): ``bf16`` runs the inner and the outer
passes under ``torch.autocast`` with bfloat16, ``float32`` (the default) runs them as they are.

Under bf16 autocast the matrix products and convolutions run in bfloat16 while the weights stay
float32 ("master weights"): autocast casts them per operation, so every gradient reaching a weight
(the inner steps' gradients, hence the fast weights, and the meta-gradient accumulated over the
tasks in ``.grad``) is float32; the losses (cross-entropy, ``log_softmax``) run in float32 as
autocast's lists prescribe. bfloat16 has float32's exponent range, so no loss scaling is needed.
Backward passes run outside autocast (each op's backward uses its forward's dtypes). The meta-test
(adaptation and query scores outside meta-training) stays in float32.

Off by default: bfloat16 keeps 8 bits of mantissa. A convolution's bf16 output rounds away most of
what batch norm then keeps (the deviations from a per-channel mean that is large against them:
inputs in [0, 1], activations after ReLU), and second-order steps amplify it: measured on the CPU
for Conv4-64 on the omniglot-20w1s shape, the plain gradient's relative error is 0.2 in the first
layers and the meta-gradient's after 2 inner steps 0.9 (cosine 0.6) against float32
(``metareg.runs.bench_memory.precision_error``). Whether a GPU's bf16 kernels do better, and at
what speed, is for the GPU check (``metareg bench --memory --device cuda`` prints both).
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
