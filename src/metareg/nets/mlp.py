"""The fully connected regressor of MAML's sine experiment (1-40-40-1, ReLU), optionally as a T-net."""

from __future__ import annotations

import functools
import itertools
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Transform, truncated_normal_
from .registry import register_backbone
from .slots import LayerInfo, PerturbationFactory, identity_factory


class MLP(nn.Module):
    """Dense layers with ReLU between them, a perturbation slot before each ReLU and one at the output.

    ``transform=True`` makes every cell ``T W`` (T-net / MT-net, thesis Eq. 3.1): a meta-learned
    ``Transform`` after each layer including the output layer. ``init="truncated_normal"``: weights
    from a normal with std 0.01 truncated at 2 std and zero biases (MAML's and the MT-net code's
    regression setting); ``"default"``: PyTorch's.
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: tuple[int, ...] = (40, 40),
        perturbation: PerturbationFactory = identity_factory,
        transform: bool = False,
        init: Literal["default", "truncated_normal"] = "default",
    ):
        super().__init__()
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.perturbs = nn.ModuleList(
            perturbation(LayerInfo(i, "dense", a, b)) for i, (a, b) in enumerate(itertools.pairwise(widths))
        )
        self.head = nn.Linear(widths[-1], out_features)
        self.head_perturb = perturbation(LayerInfo(len(hidden), "dense", widths[-1], out_features, output=True))
        self.transforms = nn.ModuleList(Transform(b) for b in hidden) if transform else None
        self.head_transform = Transform(out_features) if transform else None
        if init == "truncated_normal":
            for linear in [*self.layers, self.head]:
                truncated_normal_(linear.weight, 0.01)
                nn.init.zeros_(linear.bias)
        elif init != "default":
            raise ValueError(f"init must be default or truncated_normal, got {init!r}")

    def layer_groups(self) -> dict[str, list[str]]:
        """Named parameter groups (:mod:`metareg.selection`): the first and last hidden layers, the output layer."""
        last = len(self.layers) - 1
        return {
            "first-block": ["layers.0.*", "transforms.0.*"],
            "last-block": [f"layers.{last}.*", f"transforms.{last}.*"],
            "head": ["head.*", "head_transform.*"],
        }

    def forward(self, x: Tensor, *, sample: bool = False) -> Tensor:
        for i, (layer, perturb) in enumerate(zip(self.layers, self.perturbs)):
            pre = layer(x)
            if self.transforms is not None:
                pre = self.transforms[i](pre)
            x = F.relu(perturb(pre, x, sample=sample))  # no norm here: both positions are the same
        out = self.head(x)
        out = out if self.head_transform is None else self.head_transform(out)
        return self.head_perturb(out, x, sample=sample)


def _make_mlp(num_outputs, in_channels, image_size, perturbation, **options):  # noqa: ARG001
    return MLP(in_channels, num_outputs, perturbation=perturbation, **options)


# _make_mlp.__wrapped__ = MLP: its options are MLP's (checked against its signature)
functools.update_wrapper(_make_mlp, MLP, assigned=(), updated=())

register_backbone(
    "mlp",
    _make_mlp,
    description="the 1-40-40-1 sine regressor",
)
