"""Attach a feature perturbation to any CNN, after chosen modules, with forward hooks.

``perturbed = attach_metaperturb(model, phi, at=[...], input_shape=(3, 32, 32))`` returns a
:class:`Perturbed` module that runs ``model`` unchanged except that the output of every module
named in ``at`` (exact names or glob patterns such as ``"layer*.*.bn2"``) is replaced by
``slot(output)``, through a forward hook. The slots (one
:class:`~metareg.perturb.metaperturb.MetaPerturb` per layer, holding that layer's running
statistics as buffers) and, when it owns it, the shared function phi are submodules of the
wrapper, so ``state_dict``, ``to(device)``, ``torch.func.functional_call`` and ``vmap`` see them
like any other submodule, while the user's model keeps its structure (adding children to it would
break an ``nn.Sequential``, which runs every child it holds). The built-in backbones name their
perturbation points (``model.perturbation_points``: every block output, the paper's Figure 3), so
``at`` may be omitted for them.

The slots are sized by one forward pass of zeros (eval mode, no gradients) that records the output
shape of each chosen module; MetaPerturb's layer normalizers are the widest chosen layer's channel
count and the input's height (the released code's convention).
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .metaperturb import MetaPerturb, MetaPerturbFunction


def _resolve(model: nn.Module, at: Sequence[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in at:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"perturbation point {pattern!r} matches no module of the model; module names are: {sample}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


@torch.no_grad()
def probe(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """The model's output for a batch of 2 zero inputs of ``input_shape``, on its device and in its
    dtype, in eval mode (no running statistic moves); the model's mode is restored."""
    was_training = model.training
    reference = next(model.parameters(), None)
    try:
        model.eval()
        return model(torch.zeros(2, *input_shape, device=getattr(reference, "device", None), dtype=getattr(reference, "dtype", None)))
    finally:
        model.train(was_training)


def output_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> dict[str, torch.Size]:
    """The output shape of each named module for a batch of 2 zero inputs of ``input_shape``."""
    modules = dict(model.named_modules())
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable:
        def hook(module, inputs, output):  # noqa: ARG001
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"module {name!r} returns {type(output).__name__}, not a feature-map tensor")
            shapes[name] = output.shape
        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        probe(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError(f"module(s) {', '.join(missing)} did not run in the model's forward pass; choose modules on the path of the input")
    return shapes


def _replace_output(slot: nn.Module, module: nn.Module, inputs, output):  # noqa: ARG001
    return slot(output)


class Perturbed(nn.Module):
    """``model`` with perturbation ``slots`` after the modules named by their keys.

    ``function``: the shared perturbation function, registered here when this model owns it.
    ``forward`` is the model's own; ``detach()`` removes the hooks and returns the bare model.
    """

    def __init__(self, model: nn.Module, slots: dict[str, nn.Module], function: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.points = list(slots)
        self.slots = nn.ModuleList(slots.values())
        if function is not None:
            self.function = function
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(functools.partial(_replace_output, slot)) for name, slot in slots.items()]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def attached(self) -> dict[str, nn.Module]:
        """The slots by the name of the module they follow."""
        return dict(zip(self.points, self.slots))

    def detach(self) -> nn.Module:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model

    def extra_repr(self) -> str:
        return f"points={self.points}"


def attach(model: nn.Module, make: Callable[[dict[str, torch.Size]], dict[str, nn.Module]], at: Sequence[str],
           input_shape: Sequence[int], function: nn.Module | None = None) -> Perturbed:
    """Perturb the output of every module matched by ``at``: ``make`` gets each one's output shape
    (by name) and returns a slot module for each. ``function``: a shared module the result owns."""
    if isinstance(model, Perturbed):
        raise ConfigError("the model already has perturbations attached; detach() them first")
    names = _resolve(model, at)
    slots = make(output_shapes(model, names, input_shape))
    return Perturbed(model, {name: slots[name] for name in names}, function)


def perturbation_points(model: nn.Module) -> list[str]:
    points = getattr(model, "perturbation_points", None)
    if not points:
        raise ConfigError(f"{type(model).__name__} does not name its perturbation points: pass the modules to perturb "
                          "(at=[...], names or glob patterns of modules whose output is a feature map)")
    return list(points)


def attach_metaperturb(model: nn.Module, function: MetaPerturbFunction, at: Sequence[str] | None = None,
                       input_shape: Sequence[int] = (3, 32, 32), *, own: bool = True) -> Perturbed:
    """Perturb the outputs of the modules ``at`` (default: the model's ``perturbation_points``)
    with MetaPerturb: one slot per layer, all sharing ``function`` (phi).

    ``own=True``: the result owns ``function`` (saved and moved with it); a meta-learner that shares
    one phi among several networks owns it itself (``own=False``).
    """
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")

    def make(shapes: dict[str, torch.Size]) -> dict[str, nn.Module]:
        for name, shape in shapes.items():
            if len(shape) != 4:
                raise ConfigError(f"MetaPerturb perturbs convolutional feature maps [B, C, H, W]; module {name!r} outputs shape {tuple(shape)}")
        widest = max(shape[1] for shape in shapes.values())
        return {name: MetaPerturb(function, shape[1], widest, input_shape[1], height=shape[2]) for name, shape in shapes.items()}

    return attach(model, make, perturbation_points(model) if at is None else at, input_shape, function if own else None)


def set_strength(function: MetaPerturbFunction, strength: float) -> None:
    """The annealing coefficient c in [0, 1]: h * ((s o z - 1) c + 1)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"perturbation strength must be in [0, 1], got {strength}")
    function.strength = float(strength)


__all__ = ["Perturbed", "attach", "attach_metaperturb", "output_shapes", "perturbation_points", "probe", "set_strength"]
