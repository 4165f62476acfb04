"""The information-theoretic regularizers Meta-Dropout's Table 2 compares against, in the slot:
input-dependent noise on the features with a KL term, weighted by beta, added to the training loss.

Variational Information Bottleneck (Alemi et al. 2017), ``vib``: the features become a Gaussian
sample around themselves with an input-dependent standard deviation,

    h~ = h + sigma(x) o eps,   eps ~ N(0, I),   sigma = Softplus(phi(x)),
    KL[N(h, sigma^2) || N(0, I)] = 1/2 sum_units (h^2 + sigma^2 - 1 - 2 log sigma).

Information Dropout, ReLU version (Achille & Soatto 2018), ``information-dropout``: multiplicative
log-normal noise with an input-dependent scale; with ReLU activations and the log-uniform prior
their KL term is, up to a constant, minus the log-scale of the units that are active:

    h~ = h o exp(alpha(x) eps),   eps ~ N(0, I),   alpha = alpha_max sigmoid(phi(x)),
    KL = sum_units 1[h > 0] (-log alpha)   (+ const).

phi is a layer shaped like the block's own (as Meta-Dropout's noise generator) on the block's input,
meta-learned (in MAML's inner loop it is meta-only, as the paper does for its baselines: "we
meta-train additional parameters from the baselines by optimizing them in the inner-gradient
steps"). The KL terms are averaged over the examples and added to the pass's loss with weight
``beta`` (:func:`metareg.nets.slots.perturbed_loss`). Both sit after batch norm and before the ReLU
(the noise acts on the activations; ReLU(h e) = ReLU(h) e for e > 0). Without sampling (query
sets) the features pass unchanged (eps = 0: the mean of VIB's noise and the median of the
log-normal). Hidden layers only. Our choices where the papers leave it open: alpha_max = 0.7 (the
Information Dropout paper's cap); VIB's sigma starts at 0.1 (phi's bias at Softplus^-1(0.1)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.slots import (
    FeaturePerturbation,
    LayerInfo,
    PerturbationFactory,
    current_record,
    required_input,
    with_attributes,
)
from .meta_dropout import phi_layer
from .registry import register


def gaussian_kl(mean: Tensor, sigma: Tensor) -> Tensor:
    """KL[N(mean, sigma^2) || N(0, 1)] summed over all but the first (batch) dimension: [B]."""
    terms = 0.5 * (mean**2 + sigma**2 - 1) - torch.log(sigma)
    return terms.flatten(1).sum(1)


def _penalize(beta: float, per_example: Tensor) -> None:
    record = current_record()
    if record is not None and beta:
        record.add_penalty(beta * per_example.mean())


def _check_beta(beta: float) -> None:
    if not beta >= 0:
        raise ConfigError(f"the KL weight beta must be >= 0, got {beta}")


class VariationalBottleneck(FeaturePerturbation):
    position = "norm"

    def __init__(self, info: LayerInfo, beta: float = 1e-5, init_sigma: float = 0.1):
        super().__init__()
        _check_beta(beta)
        self.beta = beta
        self.phi = phi_layer(info, bias=math.log(math.expm1(init_sigma)))

    def sigma(self, layer_input: Tensor) -> Tensor:
        return F.softplus(self.phi(layer_input))

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:
        if not sample:
            return pre
        sigma = self.sigma(required_input(layer_input, "vib"))
        _penalize(self.beta, gaussian_kl(pre, sigma))
        return pre + sigma * torch.randn_like(pre)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class InformationDropout(FeaturePerturbation):
    position = "norm"

    def __init__(self, info: LayerInfo, beta: float = 1e-4, alpha_max: float = 0.7):
        super().__init__()
        _check_beta(beta)
        if not alpha_max > 0:
            raise ConfigError(f"information-dropout alpha_max must be > 0, got {alpha_max}")
        self.beta, self.alpha_max = beta, alpha_max
        self.phi = phi_layer(info)

    def alpha(self, layer_input: Tensor) -> Tensor:
        return self.alpha_max * torch.sigmoid(self.phi(layer_input))

    def forward(self, pre: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:
        if not sample:
            return pre
        alpha = self.alpha(required_input(layer_input, "information-dropout"))
        _penalize(self.beta, (-(pre > 0).to(pre.dtype) * torch.log(alpha)).flatten(1).sum(1))
        return pre * torch.exp(alpha * torch.randn_like(pre))

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, alpha_max={self.alpha_max:g}"


def _hidden(make) -> PerturbationFactory:
    def factory(info: LayerInfo) -> nn.Module:
        return FeaturePerturbation() if info.output else make(info)

    # In ordinary training (transfer) batch norm keeps running statistics of the *noisy* features,
    # so a noise-free test pass sees features whose variance the next batch norm does not expect
    # (measured: Information Dropout on the miniImageNet stand-in, Conv4, 15.9 % noise-free vs 39.1 %
    # averaging 10 samples). Predictions are Monte-Carlo averages over the noise, as MetaPerturb's.
    # The episodic meta-test (batch statistics) keeps its deterministic query pass (Meta-Dropout, Eq. 4).
    return with_attributes(factory, sample_at_test=True)


register("vib")(lambda beta=1e-5, init_sigma=0.1: _hidden(lambda info: VariationalBottleneck(info, beta, init_sigma)))
register("information-dropout")(
    lambda beta=1e-4, alpha_max=0.7: _hidden(lambda info: InformationDropout(info, beta, alpha_max))
)
