"""Inner update rules as chains of gradient transforms (axis 2 of the design).

One inner step turns the gradients of the support loss into an update of the fast weights:
``theta' = theta + rule(grads)``. A rule is a chain of small transforms in the manner of optax's
``chain``: each transform maps a dict of gradients to a dict of (transformed) gradients and may keep a
per-task state, created by ``init`` when a task starts (an MT-net mask is sampled there). The last
transform of a chain is a step: it turns gradients into updates (``-lr * g``).

Transforms are ``nn.Module``s, so whatever they learn (Meta-SGD's step sizes, MT-net logits) is a
meta-parameter that the outer optimizer sees. ``module.training`` says whether we are
meta-training (DropGrad acts only then).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from torch import Tensor, nn

from ..errors import ConfigError

Grads = dict[str, Tensor]


class GradientTransform(nn.Module):
    """Identity transform; subclasses override :meth:`update` (and :meth:`init` if stateful)."""

    def init(self, params: dict[str, Tensor]) -> Any:  # noqa: ARG002
        """Per-task state, created once at the start of a task's adaptation."""
        return None

    def update(self, grads: Grads, state: Any, step: int) -> tuple[Grads, Any]:  # noqa: ARG002
        return grads, state

    #: The fast parameters the transform was built for (None: it works on any): a learner checks
    #: them against its own fast weights, so a rule built for other weights is an error at once,
    #: not a missing step size later.
    fast_names: tuple[str, ...] | None = None

    def built_for(self) -> set[str] | None:
        return None if self.fast_names is None else set(self.fast_names)


class Chain(GradientTransform):
    """Apply transforms in order, each with its own state."""

    def __init__(self, *transforms: GradientTransform):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def _parts(self) -> Iterable[GradientTransform]:
        return cast("Iterable[GradientTransform]", self.transforms)  # nn.ModuleList is not generic

    def init(self, params: dict[str, Tensor]) -> list[Any]:
        return [t.init(params) for t in self._parts()]

    def update(self, grads: Grads, state: list[Any], step: int) -> tuple[Grads, list[Any]]:
        new_state = []
        for transform, s in zip(self._parts(), state):
            grads, s = transform.update(grads, s, step)
            new_state.append(s)
        return grads, new_state

    def built_for(self) -> set[str] | None:
        found = [names for t in self._parts() if (names := t.built_for()) is not None]
        if any(names != found[0] for names in found):
            raise ConfigError("the transforms of this inner rule were built for different fast parameters")
        return found[0] if found else None


def param_key(name: str) -> str:
    """A parameter name usable as an ``nn.ParameterDict`` key (no dots)."""
    return name.replace(".", "__")
