"""Second-order inner steps in bounded memory: each step's graph is rebuilt during the meta-backward
instead of being kept from the forward pass.

A second-order inner step ``theta_{k+1} = theta_k + rule(grad L_support(theta_k))`` stored the
ordinary way keeps, until the meta-backward reaches it, the support pass's activations *and* the
graph of its gradient (built with ``create_graph=True`` for the Hessian-vector products): K steps
keep K of them. :func:`recomputed_step` runs the step as one autograd node whose inputs are
``theta_k``, the rule's per-task state and the meta-parameters the step reads, and whose outputs are
``theta_{k+1}`` and the new state. Its forward computes the step without keeping any graph (a plain
first-order gradient) and saves only its inputs; its backward runs the step again with
``create_graph=True`` and takes the vector-Jacobian product of that one step with
``torch.autograd.grad``. Memory: one step's graph at a time plus K copies of the fast weights,
instead of K graphs; cost: one more support forward and backward per step.

The rebuilt step is the same computation: the random number generators (CPU, and the CUDA device
of the inputs) are restored to their state at the step's forward (the perturbations' noise is
drawn again identically, inside :func:`torch.random.fork_rng`, so the global stream is not moved),
and so is autocast (mixed precision). The model's mode and training progress must not change
between the forward and the meta-backward (they do not: the trainer differentiates each task right
after its forward).

Why not ``torch.utils.checkpoint``: with ``use_reentrant=False`` it gives the right meta-gradient
for a function that calls ``torch.autograd.grad(create_graph=True)`` inside, but that inner
backward unpacks the forward's saved tensors, which triggers a recomputation already during the
forward pass (measured: twice the forward cost, and the gradient graph's own saved tensors are still
kept); the reentrant variant does not support ``torch.autograd.grad`` inside at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

# run(fast, state, create_graph) -> (new_fast, new_state): one inner step
StepFn = Callable[[list[Tensor], Any, bool], tuple[list[Tensor], Any]]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _RecomputedStep(torch.autograd.Function):
    """Inputs: ``n_fast`` fast weights, ``n_state`` state tensors, then the meta-parameters (leaves)."""

    @staticmethod
    def forward(ctx, run: StepFn, spec: Any, n_fast: int, n_state: int, *tensors: Tensor):
        device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
        ctx.run, ctx.spec, ctx.n_fast, ctx.n_state, ctx.device = run, spec, n_fast, n_state, device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.autocast = _autocast_state(device.type)
        n = n_fast + n_state
        fast, state = _inputs([t.detach().requires_grad_(t.requires_grad) for t in tensors[:n]], n_fast, n_state, spec)
        with torch.enable_grad():
            new_fast, new_state = run(fast, state, False)
        new_state_tensors, (_, out_spec) = _tensors(new_state)
        if out_spec != spec[1]:
            raise ValueError("an inner rule's state must keep its structure from step to step to be recomputed")
        ctx.save_for_backward(*tensors)
        return tuple(t.detach() for t in [*new_fast, *new_state_tensors])

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        tensors = ctx.saved_tensors
        n = ctx.n_fast + ctx.n_state
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors[:n]] + list(tensors[n:])
        fast, state = _inputs(inputs, ctx.n_fast, ctx.n_state, ctx.spec)
        enabled, dtype = ctx.autocast
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.autocast(ctx.device.type, dtype=dtype) if enabled else nullcontext():
                new_fast, new_state = ctx.run(fast, state, True)
        outputs = [*new_fast, *_tensors(new_state)[0]]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        grads: list[Tensor | None] = [None] * len(inputs)
        if pairs and wanted:
            found = torch.autograd.grad(
                [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs], allow_unused=True
            )
            for i, g in zip(wanted, found):
                grads[i] = g
        return (None, None, None, None, *grads)


def _tensors(tree: Any) -> tuple[list[Tensor], Any]:
    """The tensors of a pytree (the rule's state), and what rebuilds it from them."""
    leaves, spec = pytree.tree_flatten(tree)
    return [x for x in leaves if isinstance(x, Tensor)], (leaves, spec)


def _inputs(tensors: Sequence[Tensor], n_fast: int, n_state: int, spec: Any) -> tuple[list[Tensor], Any]:
    leaves, tree_spec = spec
    state_tensors = iter(tensors[n_fast : n_fast + n_state])
    state = pytree.tree_unflatten([next(state_tensors) if isinstance(x, Tensor) else x for x in leaves], tree_spec)
    return list(tensors[:n_fast]), state


def recomputed_step(run: StepFn, fast: list[Tensor], state: Any, leaves: Sequence[Tensor]) -> tuple[list[Tensor], Any]:
    """One inner step ``run(fast, state, create_graph)`` whose graph is rebuilt in the meta-backward.

    ``leaves``: every tensor outside ``fast`` and ``state`` that the step reads and that needs a
    meta-gradient (the slow weights, the perturbations' and the rule's parameters); the step reads
    them as they are (they must be leaves, e.g. ``nn.Parameter``s, that do not change before the
    meta-backward). Returns the new fast weights and state, as ``run`` would with
    ``create_graph=True``, with the same values and the same meta-gradient."""
    state_tensors, spec = _tensors(state)
    outputs = _RecomputedStep.apply(run, spec, len(fast), len(state_tensors), *fast, *state_tensors, *leaves)
    new_fast = list(outputs[: len(fast)])
    new_state_tensors = iter(outputs[len(fast) :])
    # the new state has the shape of the old one (a rule's state keeps its structure from step to step)
    leaves_out, tree_spec = spec
    new_state = pytree.tree_unflatten(
        [next(new_state_tensors) if isinstance(x, Tensor) else x for x in leaves_out], tree_spec
    )
    return new_fast, new_state
