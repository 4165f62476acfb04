"""A whole training step captured once as a CUDA graph and replayed (GPU only).

On a GPU a meta-iteration of small convolutions is bound by kernel launches and Python, not by
arithmetic: replaying one captured graph of the whole step (episode gather, inner loop,
meta-backward, clipping, Adam with ``capturable=True``) removes both. :class:`CapturedStep` takes a
function of tensors that returns a dict of tensors, with fixed shapes and no host synchronization,
and:

* copies each call's inputs into static device buffers and replays the graph;
* leaves the optimizer's state allocated before capture (the warm-up creates Adam's moments, then
  resets them to their fresh zeros), so the graph never re-initializes it;
* captures on the first call, after a few warm-up runs on a side stream (CUDA's requirement). The
  warm-up runs are real executions of the step, so every piece of state they touch (parameters,
  buffers, optimizer state, the CPU and CUDA random generators) is saved before and restored after:
  capturing changes nothing, and a run resumed from a checkpoint captures again and continues with
  the very same random numbers (the CUDA generator is graph-safe: each replay advances its offset);
* returns clones of the graph's outputs (a replay overwrites them).

Capture can fail (an op that is not capturable, an old driver): :func:`capture_or_none` then
reports why, once, and the caller runs the step eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class CapturedStep:
    """``fn(*inputs)`` as a CUDA graph; ``modules`` and ``optimizers`` hold the state it changes."""

    def __init__(
        self,
        fn: Callable[..., dict[str, Tensor]],
        example: Sequence[Tensor],
        *,
        modules: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        device: torch.device,
        warmup: int = 3,
    ):
        self.device = device
        self.inputs = [t.to(device).clone() for t in example]
        saved = save_state(modules, optimizers)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        restore_state(saved, modules, optimizers)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)
        restore_state(
            saved, modules, optimizers
        )  # capture records kernels only, but restore the generators' view of it too

    def __call__(self, *inputs: Tensor) -> dict[str, Tensor]:
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}


def capture_or_none(
    fn: Callable[..., dict[str, Tensor]],
    example: Sequence[Tensor],
    *,
    modules: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    device: torch.device,
) -> CapturedStep | None:
    """A :class:`CapturedStep`, or None (with one warning saying why) where capture is impossible."""
    if device.type != "cuda":
        return None
    try:
        return CapturedStep(fn, example, modules=modules, optimizers=optimizers, device=device)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        warnings.warn(
            f"CUDA graph capture failed ({str(err).splitlines()[0]}); running the training step eagerly", stacklevel=2
        )
        return None


def save_state(modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> dict:
    return {
        "modules": [{k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()} for m in modules],
        "optimizers": [
            {
                id(p): {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
                for p, state in o.state.items()
            }
            for o in optimizers
        ],
        "grads": [[p.grad for p in m.parameters()] for m in modules],
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


@torch.no_grad()
def restore_state(saved: dict, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> None:
    for module, state in zip(modules, saved["modules"]):
        for key, value in module.state_dict(keep_vars=True).items():
            value.copy_(state[key])
    for optimizer, states in zip(optimizers, saved["optimizers"]):
        for p, state in optimizer.state.items():
            before = states.get(id(p))
            for k, v in state.items():
                if before is None:  # created by the warm-up: back to Adam's fresh state (zero moments, step 0)
                    if isinstance(v, Tensor):
                        v.zero_()
                elif isinstance(before[k], Tensor):
                    v.copy_(before[k])
                else:
                    state[k] = before[k]
    torch.set_rng_state(saved["cpu_rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
