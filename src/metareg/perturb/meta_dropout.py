"""Meta-Dropout (Lee, Nam, Yang & Hwang, ICLR 2020) and the noise ablations of its Table 3.

Paper, Section 3.1, for every hidden layer l with input h^(l-1) and pre-activation f^(l):

    z^(l) = Softplus(a^(l)),   a^(l) ~ N(mu^(l)(h^(l-1)), I)          (Eq. 5)
    h^(l) = ReLU(f^(l)(h^(l-1)) o z^(l))                               (Eq. 6)

In code: ``mu^(l)`` is ``MultiplicativeNoise.phi`` (the noise generator phi: a layer with the shape of
theta's layer, run on the same input ``layer_input``), ``f^(l)`` is ``pre``, ``a`` is drawn with the
reparameterization ``mu + eps`` (Kingma & Welling) so gradients reach phi, and the support set
samples (``sample=True``, Algorithm 1 line 6) while the query set uses ``a = mu`` (Eq. 4, z-bar).
phi is meta-only: the presets' fast patterns leave it out, so the inner loop never adapts it.

Facts of the released reference implementation that we follow: the noise multiplies the
convolution's output *before* batch norm, i.e. h = ReLU(BN(f o z)) (``position = "linear"``);
phi's convolutions start truncated-normal (std 0.02) with zero biases; the last (dense) layer gets
additive noise instead, logits ~ N(mu, sigma^2) with mu = theta's logits and sigma = Softplus of a
one-column phi dense layer shared by all classes (:class:`AdditiveGaussianOutput`), sampled only
where the inner loop samples.

Ablations (Table 3), the same module with other settings (``register`` names in brackets):
- Fixed Gaussian [fixed-gaussian]: a ~ N(0, I), no parameters.
- Independent Gaussian [independent-gaussian]: a ~ N(mu, I) with a learnable mu per channel.
- Deterministic Meta-Dropout [meta-dropout-deterministic]: a = mu for support and query.
- Meta-Dropout w/ learned variance [meta-dropout-learned-variance]:
  a ~ N(mu(h), diag(sigma(h))^2), sigma = Softplus(phi_sigma(h)) (a second phi layer).
Weight Gaussian is in ``weight_gaussian.py``. The ablations other than the learned-variance one
leave the output layer unperturbed (the paper perturbs the hidden layers in all of them).

Table 2's beta rows (Meta-Dropout with the KL term of the information-theoretic baselines): option
``kl`` (beta) adds beta * KL[N(mu, I) || N(0, I)] = beta |mu|^2 / 2 per example (summed over the
units, averaged over the batch) to the inner loss: the paper does not spell this term out; with a
fixed unit variance it is the KL of a's Gaussian to the standard normal prior.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.layers import bias_of, truncated_normal_
from ..nets.slots import (
    FeaturePerturbation,
    LayerInfo,
    PerturbationFactory,
    current_record,
    required_input,
)
from .registry import register


def phi_layer(info: LayerInfo, out_features: int | None = None, bias: float = 0.0) -> nn.Conv2d | nn.Linear:
    """A noise-generator layer with the shape of theta's layer at ``info`` (reference init; its bias
    ``bias``)."""
    out = out_features or info.out_features
    layer: nn.Conv2d | nn.Linear
    if info.kind == "conv":
        layer = nn.Conv2d(info.in_features, out, info.kernel_size, info.stride, info.padding)
        truncated_normal_(layer.weight, 0.02)
    else:
        layer = nn.Linear(info.in_features, out)
        nn.init.normal_(layer.weight, std=0.02)
    nn.init.constant_(bias_of(layer), bias)
    return layer


class MultiplicativeNoise(FeaturePerturbation):
    """``pre * Softplus(a)`` with ``a ~ N(mu, sigma^2)`` (Eq. 5-6); ``a = mu`` when not sampling.

    ``mean``: ``"input"`` mu = phi(h^(l-1)) (Meta-Dropout), ``"channel"`` a learnable mu per channel,
    ``"zero"`` mu = 0. ``variance``: ``"fixed"`` sigma = 1, ``"input"`` sigma = Softplus(phi_sigma(h^(l-1))).
    ``stochastic=False``: a = mu always (deterministic Meta-Dropout).
    """

    position = "linear"

    def __init__(
        self,
        info: LayerInfo,
        mean: Literal["input", "channel", "zero"] = "input",
        variance: Literal["fixed", "input"] = "fixed",
        stochastic: bool = True,
        kl: float = 0.0,
    ):
        super().__init__()
        if not kl >= 0:
            raise ConfigError(f"meta-dropout's KL weight kl must be >= 0, got {kl}")
        self.kl = kl
        if mean not in ("input", "channel", "zero"):
            raise ConfigError(f"multiplicative-noise mean must be input, channel or zero, got {mean!r}")
        if variance not in ("fixed", "input"):
            raise ConfigError(f"multiplicative-noise variance must be fixed or input, got {variance!r}")
        self.kind, self.mean_kind, self.stochastic = info.kind, mean, stochastic
        self.phi = phi_layer(info) if mean == "input" else None
        self.mu = nn.Parameter(torch.zeros(info.out_features)) if mean == "channel" else None
        self.phi_sigma = phi_layer(info) if variance == "input" else None

    def mean(self, pre: Tensor, layer_input: Tensor | None) -> Tensor:
        """mu^(l): the mean of a, broadcastable to ``pre``."""
        if self.phi is not None:
            return self.phi(required_input(layer_input, "meta-dropout"))
        if self.mu is not None:
            return self.mu.view(-1, *[1] * (pre.dim() - 2)) if self.kind == "conv" else self.mu
        return pre.new_zeros(())

    def noise(self, pre: Tensor, layer_input: Tensor | None, *, sample: bool) -> Tensor:
        """z^(l) = Softplus(a^(l)), shaped like ``pre`` when sampled."""
        a = self.mean(pre, layer_input)
        if sample and self.kl:  # Table 2's beta rows: KL[N(mu, I) || N(0, I)] = |mu|^2 / 2 per example, weighted
            record = current_record()
            if record is not None:
                record.add_penalty(self.kl * 0.5 * (a.expand_as(pre) ** 2).flatten(1).sum(1).mean())
        if sample and self.stochastic:
            eps = torch.randn_like(pre)
            a = a + (
                eps
                if self.phi_sigma is None
                else F.softplus(self.phi_sigma(required_input(layer_input, "meta-dropout"))) * eps
            )
        return F.softplus(a)

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:
        return pre * self.noise(pre, layer_input, sample=sample)

    def extra_repr(self) -> str:
        variance = "input" if self.phi_sigma is not None else "fixed"
        return f"mean={self.mean_kind}, variance={variance}, stochastic={self.stochastic}"


class AdditiveGaussianOutput(FeaturePerturbation):
    """The last layer of Meta-Dropout's reference: logits ~ N(mu, sigma^2) when sampling, where mu is
    theta's output and sigma = Softplus(h w_phi + b_phi), one column shared by all outputs."""

    position = "linear"

    def __init__(self, info: LayerInfo):
        super().__init__()
        self.phi = phi_layer(info, out_features=1)

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:
        if not sample:
            return pre
        sigma = F.softplus(self.phi(required_input(layer_input, "meta-dropout").flatten(1)))
        return pre + sigma * torch.randn_like(pre)


def multiplicative_noise(
    mean: Literal["input", "channel", "zero"] = "input",
    variance: Literal["fixed", "input"] = "fixed",
    stochastic: bool = True,
    output_noise: bool = True,
    kl: float = 0.0,
) -> PerturbationFactory:
    """Factory: :class:`MultiplicativeNoise` at every hidden layer; at the output layer
    :class:`AdditiveGaussianOutput` if ``output_noise`` (and the noise is stochastic), else none."""

    def make(info: LayerInfo) -> nn.Module:
        if info.output:
            return AdditiveGaussianOutput(info) if output_noise and stochastic else FeaturePerturbation()
        return MultiplicativeNoise(info, mean, variance, stochastic, kl)

    return make


register("multiplicative-noise")(multiplicative_noise)
register("meta-dropout")(
    lambda output_noise=True, kl=0.0: multiplicative_noise("input", "fixed", True, output_noise, kl)
)
register("meta-dropout-deterministic")(lambda: multiplicative_noise("input", "fixed", stochastic=False))
register("meta-dropout-learned-variance")(
    lambda output_noise=True: multiplicative_noise("input", "input", True, output_noise)
)
register("fixed-gaussian")(lambda: multiplicative_noise("zero", output_noise=False))
register("independent-gaussian")(lambda: multiplicative_noise("channel", output_noise=False))
