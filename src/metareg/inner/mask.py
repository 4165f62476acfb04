"""MT-net's subspace mask (Lee & Choi 2018; thesis Section 3.2, Eq. 3.6-3.9).

    W~ = W - alpha * M o grad_W L                                   (3.6)
    row j of M ~ Bern(e^zeta_j / (e^zeta_j + 1)) 1^T                 (3.7)
    m_j = exp((zeta_j + g1)/c) / (exp((zeta_j + g1)/c) + exp(g2/c)),  g1, g2 ~ Gumbel(0, 1)  (3.8-3.9)

M is sampled once per task (``init``) and kept for all its inner steps. The forward value is the
binary mask (m_j > 1/2, i.e. zeta_j + g1 - g2 > 0) and the gradient reaches zeta through the soft
value of Eq. 3.9 (straight-through Gumbel-softmax). ``per="row"``: one logit per output unit, shared
by the unit's weights and its bias ("MT-net"); ``per="weight"``: one logit per weight ("-full").
Logits start at 0 (thesis 6.1), so every row is updated with probability 1/2 at the start.

Reported "fraction of weights changed": the probability that a weight is updated under Eq. 3.7,
e^zeta / (e^zeta + 1), averaged over the logits of a layer. (Section 6.3 writes the same expectation
with e^-zeta, which under Eq. 3.7 is the fraction *not* changed; we follow the sampling equations.)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..selection import select
from .base import GradientTransform, Grads, param_key
from .registry import register


def _gumbel(shape: torch.Size, like: Tensor) -> Tensor:
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand(shape, dtype=like.dtype, device=like.device) * (1 - 2 * tiny) + tiny  # in (0, 1)
    return -torch.log(-torch.log(u))


class SubspaceMask(GradientTransform):
    """MT-net's subspace mask (thesis Eq. 3.6-3.9): per task, a binary mask over the rows
    (``per="row"``) or the weights (``per="weight"``, the "-full" variant) of the chosen layers is
    sampled from meta-learned logits zeta with the straight-through Gumbel-softmax at
    ``temperature``; the inner gradients are multiplied by it, so only the masked subspace adapts.

    Usually built by name inside an inner rule, as ``{"name": "subspace-mask", **options}``.

    Args:
        fast_params: the fast weights (name -> tensor) the rule is built for.
        layers: the masked parameters (glob patterns or layer groups); a masked row's bias shares
            its mask.
        per: ``row`` (one logit per output unit: M-net / MT-net) or ``weight`` (one per weight:
            "-full").
        temperature: the Gumbel-softmax temperature c of Eq. 3.9.
        init: the logits' initial value (0: every row is updated with probability 1/2).
        groups: the backbone's layer groups (given by the learner).

    Examples:
        ```python
        import torch
        import metareg

        net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        learner = metareg.MAML(net, lr=0.01, steps=1, task="regression",
                               transforms=[{"name": "subspace-mask", "per": "row"}])
        mask = learner.inner.transforms[0]
        print(mask.update_fractions())   # per layer: the probability that a row is updated
        ```
    """

    def __init__(
        self,
        fast_params: dict[str, Tensor],
        layers: list[str] | tuple[str, ...] = ("*weight",),
        per: Literal["row", "weight"] = "row",
        temperature: float = 1.0,
        init: float = 0.0,
        groups: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        if per not in ("row", "weight"):
            raise ConfigError(f"subspace-mask per must be row or weight, got {per!r}")
        if temperature <= 0:
            raise ConfigError(f"subspace-mask temperature must be > 0, got {temperature}")
        self.fast_names = tuple(fast_params)
        self.names = select(list(fast_params), list(layers), groups, what="fast parameter", role="subspace-mask layer")
        self.per, self.temperature = per, temperature
        # The bias of a masked row is masked with it (it feeds the same activation).
        self.biases = {
            n: n.removesuffix("weight") + "bias"
            for n in self.names
            if n.endswith("weight") and n.removesuffix("weight") + "bias" in fast_params
        }
        self.logits = nn.ParameterDict(
            {
                param_key(n): nn.Parameter(
                    torch.full(fast_params[n].shape[:1] if per == "row" else fast_params[n].shape, float(init))
                )
                for n in self.names
            }
        )

    def sample(self, name: str) -> Tensor:
        """One task's mask for parameter ``name``: binary forward, soft (Eq. 3.9) gradient."""
        zeta = self.logits[param_key(name)]
        g1, g2 = _gumbel(zeta.shape, zeta), _gumbel(zeta.shape, zeta)
        logit = zeta + g1 - g2
        soft = torch.sigmoid(logit / self.temperature)
        hard = (logit > 0).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly binary forward, soft gradient

    def init(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        masks = {}
        for name in self.names:
            m = self.sample(name)
            if self.per == "row":
                masks[name] = m.view(-1, *[1] * (params[name].dim() - 1))
                if name in self.biases:
                    masks[self.biases[name]] = m
            else:
                masks[name] = m
        return masks

    def update(self, grads: Grads, state: dict[str, Tensor], step: int) -> tuple[Grads, dict[str, Tensor]]:  # noqa: ARG002
        return {n: g * state[n] if n in state else g for n, g in grads.items()}, state

    def update_fractions(self) -> dict[str, float]:
        """Per masked parameter, the expected fraction of its weights a task changes; under "all",
        the same expectation over every logit of the network (the thesis's Section 6.3 figure)."""
        probs = {n: torch.sigmoid(self.logits[param_key(n)].detach()) for n in self.names}
        fractions = {n: p.mean().item() for n, p in probs.items()}
        fractions["all"] = torch.cat([p.flatten() for p in probs.values()]).mean().item()
        return fractions


register("subspace-mask")(SubspaceMask)
