"""Put any registered perturbation into a user's own ``nn.Module``, after chosen modules, with hooks.

The built-in backbones have perturbation slots (``metareg.nets.slots``); a network of your own does
not. ``perturbed = attach(model, factory, at=[...], input_shape=(3, 32, 32))`` returns a
:class:`Perturbed` module that runs ``model`` unchanged except that the output of every module
named in ``at`` (exact names or glob patterns such as ``"layer*.*.bn2"``; default: the model's
``perturbation_points``) is replaced by ``slot(output, module_input, sample=...)`` through a
forward hook. The slots, one per chosen module, come from the factory exactly as a backbone would
ask for them (a :class:`~metareg.nets.slots.LayerInfo` describing the layer, measured by one
forward pass of zeros), so every registered perturbation attaches the same way. The slots and the
factory's shared function (MetaPerturb's phi) are the wrapper's submodules: ``state_dict``,
``to(device)`` and ``torch.func.functional_call`` see them, while the user's model keeps its
structure (adding children to it would break an ``nn.Sequential``, which runs every child it holds).

Sampling is an argument, as everywhere: ``perturbed(x, sample=True)``. Left out, it follows the
module's mode (sample while training, the deterministic mean in eval mode), except for
perturbations that sample at test time too (MetaPerturb: its predictions are Monte-Carlo averages).
The hooks read it from a context variable set for the duration of the call, never from a flag
stored on a module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextvars import ContextVar

import torch
from torch import nn

from ..errors import ConfigError
from ..nets.slots import LayerInfo, PerturbationFactory
from ..selection import select
from .metaperturb import MetaPerturbFunction, metaperturb_slots

_SAMPLE: ContextVar[bool] = ContextVar("metareg_perturb_sample", default=False)


@torch.no_grad()
def probe(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """The model's output for a batch of 2 zero inputs of ``input_shape``, on its device and in its
    dtype, in eval mode (no running statistic moves); the model's mode is restored."""
    was_training = model.training
    reference = next(model.parameters(), None)
    try:
        model.eval()
        return model(
            torch.zeros(
                2, *input_shape, device=getattr(reference, "device", None), dtype=getattr(reference, "dtype", None)
            )
        )
    finally:
        model.train(was_training)


def layer_shapes(
    model: nn.Module, names: Sequence[str], input_shape: Sequence[int]
) -> dict[str, tuple[torch.Size, torch.Size]]:
    """(input shape, output shape) of each named module for a batch of 2 zero inputs."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    def record(name: str) -> Callable:
        def hook(module, inputs, output):  # noqa: ARG001
            if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
                raise ConfigError(
                    f"module {name!r} does not map a tensor to a tensor; choose modules whose output is a feature map"
                )
            shapes[name] = (inputs[0].shape, output.shape)

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        probe(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError(
            f"module(s) {', '.join(missing)} did not run in the model's forward pass; choose modules on the "
            f"path of the input"
        )
    return shapes


def layer_infos(
    shapes: dict[str, tuple[torch.Size, torch.Size]], input_shape: Sequence[int], running_stats: bool
) -> dict[str, LayerInfo]:
    """What a factory needs to know of each hooked layer, read off its input and output shapes."""
    widths = [out[1] for _, out in shapes.values() if len(out) == 4]
    infos = {}
    for i, (name, (inp, out)) in enumerate(shapes.items()):
        conv = len(out) == 4
        stride = max(1, inp[-1] // out[-1]) if conv and len(inp) == 4 else 1
        infos[name] = LayerInfo(
            i,
            "conv" if conv else "dense",
            inp[1],
            out[1],
            kernel_size=3 if conv else 1,
            stride=stride,
            padding=1 if conv else 0,
            size=out[2] if conv else None,
            network_width=max(widths, default=None),
            input_size=input_shape[1] if len(input_shape) > 1 else None,
            running_stats=running_stats,
        )
    return infos


def _replace_output(slot: nn.Module, module: nn.Module, inputs, output):  # noqa: ARG001
    return slot(output, inputs[0] if inputs else None, sample=_SAMPLE.get())


class Perturbed(nn.Module):
    """``model`` with perturbation ``slots`` after the modules named by their keys.

    ``function``: the factory's shared function, registered here when this model owns it.
    ``forward(*args, sample=None, **kwargs)`` is the model's own; ``detach()`` removes the hooks and
    returns the bare model.
    """

    def __init__(
        self,
        model: nn.Module,
        slots: dict[str, nn.Module],
        function: nn.Module | None = None,
        *,
        sample_at_test: bool = False,
    ):
        super().__init__()
        self.model = model
        self.points = list(slots)
        self.slots = nn.ModuleList(slots.values())
        self.sample_at_test = sample_at_test
        if function is not None:
            self.perturbation_function = function
        modules = dict(model.named_modules())
        self._handles = [
            modules[name].register_forward_hook(functools.partial(_replace_output, slot))
            for name, slot in slots.items()
        ]

    def forward(self, *args, sample: bool | None = None, **kwargs):
        token = _SAMPLE.set(bool(self.training or self.sample_at_test) if sample is None else sample)
        try:
            return self.model(*args, **kwargs)
        finally:
            _SAMPLE.reset(token)

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


def perturbation_points(model: nn.Module) -> list[str]:
    points = getattr(model, "perturbation_points", None)
    if not points:
        raise ConfigError(
            f"{type(model).__name__} does not name its perturbation points: pass the modules to perturb "
            "(at=[...], names or glob patterns of modules whose output is a feature map)"
        )
    return list(points)


def attach(
    model: nn.Module,
    perturbation: PerturbationFactory,
    at: Sequence[str] | None = None,
    input_shape: Sequence[int] = (3, 32, 32),
    *,
    running_stats: bool = True,
    own: bool = True,
) -> Perturbed:
    """Put a registered perturbation into your own network: the output of every module matched
    by ``at`` is replaced by ``slot(output, module_input, sample=...)`` through a forward hook.

    Your model is untouched; the slots (one per matched module) and the factory's shared function
    are submodules of the returned wrapper, so ``state_dict``, ``.to()`` and
    ``torch.func.functional_call`` see them; ``wrapper.detach()`` gives the bare model back.

    Args:
        model: any ``nn.Module`` whose chosen modules output feature maps ``[B, C, H, W]`` (or
            features ``[B, F]``).
        perturbation: a factory from :func:`metareg.build_perturbation`.
        at: module names or glob patterns (``"layer*.*.bn2"``); default: the model's
            ``perturbation_points``.
        input_shape: the shape of one input: a forward pass of zeros measures each layer.
        running_stats: the model is trained ordinarily (its perturbations may keep running
            statistics for eval mode); ``False`` for episodic (MAML-style) training.
        own: ``False``: the factory's shared function is owned elsewhere (not saved with this
            wrapper).

    Returns:
        The wrapper, called as ``wrapper(x, sample=True|False)`` (left out: sample while
        training, the mean in eval mode, except perturbations that sample at test time too).

    Raises:
        metareg.errors.ConfigError: ``at`` matches no module, or a module whose output the
            perturbation cannot take (one line).

    Examples:
        ```python
        import torch
        from torch import nn
        import metareg

        cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 28 * 28, 5))
        net = metareg.attach(cnn, metareg.build_perturbation("meta-dropout"), at=["0", "2"], input_shape=(1, 28, 28),
                             running_stats=False)
        x = torch.rand(4, 1, 28, 28)
        assert not torch.equal(net(x, sample=True), net(x, sample=False))   # noise drawn vs its mean
        ```
    """
    if isinstance(model, Perturbed):
        raise ConfigError("the model already has perturbations attached; detach() them first")
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    names = [n for n, _ in model.named_modules() if n]
    chosen = select(
        names, list(perturbation_points(model) if at is None else at), what="module", role="perturbation point"
    )
    infos = layer_infos(layer_shapes(model, chosen, input_shape), input_shape, running_stats)
    slots = {name: perturbation(info) for name, info in infos.items()}
    return Perturbed(
        model,
        slots,
        getattr(perturbation, "shared", None) if own else None,
        sample_at_test=getattr(perturbation, "sample_at_test", False),
    )


def attach_metaperturb(
    model: nn.Module,
    function: MetaPerturbFunction,
    at: Sequence[str] | None = None,
    input_shape: Sequence[int] = (3, 32, 32),
    *,
    own: bool = True,
) -> Perturbed:
    """MetaPerturb in your own network: one slot after each module of ``at``, all sharing phi.

    Args:
        model: any ``nn.Module`` whose chosen modules output feature maps ``[B, C, H, W]``.
        function: phi, e.g. :func:`metareg.load_phi` ``("builtin")`` (frozen) or a fresh
            ``MetaPerturbFunction`` to meta-learn.
        at: module names or glob patterns (MetaPerturb perturbs every block's output).
        input_shape: the shape of one input.
        own: ``False``: phi is owned elsewhere (not saved with this wrapper).

    Returns:
        The wrapper (see :func:`attach`).

    Examples:
        ```python
        import torch
        from torch import nn
        import metareg

        cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        phi = metareg.load_phi("builtin")                          # the shipped 82 parameters, frozen
        net = metareg.attach_metaperturb(cnn, phi, at=["1"], input_shape=(3, 32, 32))
        print(net(torch.rand(8, 3, 32, 32), sample=True).shape)   # [8, 10]
        ```
    """
    return attach(model, metaperturb_slots(function), at, input_shape, own=own)


def set_strength(function: MetaPerturbFunction, strength: float) -> None:
    """Set MetaPerturb's strength c: every slot computes h * ((s o z - 1) c + 1), so c = 0 is the
    identity and c = 1 is the paper's Eq. 2; annealed from 0 to 1 over the first 40% of training.

    Args:
        function: phi.
        strength: c in [0, 1].

    Raises:
        metareg.errors.ConfigError: ``strength`` outside [0, 1].

    Examples:
        ```python
        import metareg

        phi = metareg.load_phi("builtin")
        total = 1000
        for step in (0, 200, 400, 999):
            metareg.set_strength(phi, min(1.0, step / (0.4 * total)))
        ```
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"perturbation strength must be in [0, 1], got {strength}")
    function.strength = float(strength)


__all__ = ["Perturbed", "attach", "attach_metaperturb", "layer_shapes", "perturbation_points", "probe", "set_strength"]
