"""Adversarial perturbations of inputs: the gradient attacks (FGSM, PGD in L-infinity, L2 and L1
balls, Expectation over Transformation for stochastic models), and inner-loop adversarial training,
the baseline of Meta-Dropout's Table 2 / Figure 5 (``adversarial``: MAML's inner steps train on
FGSM examples of the support set).

An attack maximizes ``loss_of(x)`` over the ball ``||x' - x|| <= epsilon`` intersected with the
pixel range [0, 1] (images are in [0, 1] as the data sets deliver them):

* PGD (Madry et al. 2018): ``steps`` steps of size ``step_size`` along the steepest-ascent direction
  of the norm, each followed by the projection on the ball, from a random start in the ball;
  L-infinity: sign(g); L2: g / ||g||_2; L1: the signs of the gradient's largest 1% coordinates,
  rescaled to unit L1 norm (the sparse steepest ascent of Tramer & Boneh 2019, since sign(g) of a
  single coordinate would crawl), projected with Duchi et al.'s (2008) exact L1-ball projection;
* FGSM (Goodfellow et al. 2015): one L-infinity step of size epsilon from x;
* EoT (Athalye et al. 2018): against a stochastic model the gradient of each step is the average
  over ``draws`` evaluations of the (noisy) loss; ``draws=1`` is plain PGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.slots import FeaturePerturbation, LayerInfo, PerturbationFactory, with_attributes
from .registry import register

Norm = Literal["linf", "l2", "l1"]
L1_SPARSITY = 0.99  # an L1 step moves the gradient's top 1% coordinates


def input_gradient(loss_of: Callable[[Tensor], Tensor], x: Tensor, draws: int = 1) -> Tensor:
    """d loss / d x at ``x``, averaged over ``draws`` evaluations of a stochastic ``loss_of``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = cast(Tensor, sum(loss_of(x) for _ in range(draws))) / draws  # draws >= 1: a tensor, never 0
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _flat_norm(t: Tensor, p: float) -> Tensor:
    return t.flatten(1).norm(p=p, dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def steepest_ascent(grad: Tensor, norm: Norm) -> Tensor:
    """The unit-norm direction of steepest ascent of the norm's ball, per example."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _flat_norm(grad, 2)
    flat = grad.flatten(1).abs()
    k = max(1, round((1 - L1_SPARSITY) * flat.shape[1]))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    chosen = (flat >= threshold).to(grad.dtype).view_as(grad)
    return grad.sign() * chosen / chosen.flatten(1).sum(1).clamp_min(1).view(-1, *([1] * (grad.dim() - 1)))


def project_l1(delta: Tensor, epsilon: float) -> Tensor:
    """Euclidean projection of each example's ``delta`` on the L1 ball of radius ``epsilon`` (Duchi et al. 2008)."""
    flat = delta.flatten(1)
    inside = flat.abs().sum(1) <= epsilon
    magnitude, _ = flat.abs().sort(dim=1, descending=True)
    cumulative = magnitude.cumsum(1)
    index = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    positive = magnitude - (cumulative - epsilon) / index > 0
    rho = positive.to(flat.dtype).mul(index).argmax(1, keepdim=True)  # the last index where it holds
    theta = (cumulative.gather(1, rho) - epsilon) / (rho + 1).to(flat.dtype)
    projected = flat.sign() * (flat.abs() - theta).clamp_min(0)
    return torch.where(inside[:, None], flat, projected).view_as(delta)


def project(delta: Tensor, norm: Norm, epsilon: float) -> Tensor:
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    if norm == "l2":
        return delta * (epsilon / _flat_norm(delta, 2)).clamp(max=1)
    return project_l1(delta, epsilon)


def random_start(x: Tensor, norm: Norm, epsilon: float) -> Tensor:
    """A random point of the ball around ``x``: uniform for L-infinity, uniform in radius and
    direction for L2 and L1 (L1: a Laplace direction projected on the ball)."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-epsilon, epsilon)
    direction = torch.randn_like(x) if norm == "l2" else torch.distributions.Laplace(0.0, 1.0).sample(x.shape).to(x)
    radius = epsilon * torch.rand(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype, device=x.device)
    return project(direction / _flat_norm(direction, 2 if norm == "l2" else 1) * radius, norm, epsilon)


@dataclass(frozen=True)
class PGD:
    """Projected gradient ascent in the ``norm`` ball of radius ``epsilon`` (see the module docstring).
    ``step_size`` defaults to 2.5 epsilon / steps (Madry et al.); ``draws`` > 1 is EoT."""

    norm: Norm = "linf"
    epsilon: float = 0.1
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    draws: int = 1

    def __post_init__(self):
        if self.norm not in ("linf", "l2", "l1"):
            raise ConfigError(f"attack norm must be linf, l2 or l1, got {self.norm!r}")
        if (
            not self.epsilon >= 0
            or self.steps < 1
            or self.draws < 1
            or (self.step_size is not None and not self.step_size > 0)
        ):
            raise ConfigError(f"attack needs epsilon >= 0, steps >= 1, draws >= 1 and a positive step size, got {self}")
        if not math.isfinite(self.epsilon) or (self.step_size is not None and not math.isfinite(self.step_size)):
            raise ConfigError(f"an attack's epsilon and step size must be finite numbers, got {self.epsilon}")
        if self.norm == "linf" and self.epsilon > 1:
            raise ConfigError(
                f"an L-infinity attack of size {self.epsilon:g} is larger than the pixel range: images are in [0, 1], "
                "so epsilon must be in [0, 1]"
            )

    def check_size(self, pixels: int) -> None:
        """Refuse a ball larger than the image cube [0, 1]^pixels it attacks: its diameter is 1 in
        L-infinity, sqrt(pixels) in L2 and ``pixels`` in L1; a larger epsilon would be the same attack
        (or overflow the step to inf)."""
        largest = {"linf": 1.0, "l2": math.sqrt(pixels), "l1": float(pixels)}[self.norm]
        if self.epsilon > largest:
            raise ConfigError(
                f"a pgd-{self.norm} attack of size {self.epsilon:g} is larger than the distance between any two images "
                f"of {pixels} values in [0, 1] ({largest:g}): epsilon must be in [0, {largest:g}]"
            )

    def __call__(self, loss_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """The adversarial version of ``x`` (detached)."""
        x = x.detach()
        if x.dim() > 1:
            self.check_size(x[0].numel())
        if self.epsilon == 0:
            return x
        step = self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps
        delta = random_start(x, self.norm, self.epsilon) if self.random_start else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(self.steps):
            grad = input_gradient(loss_of, x + delta, self.draws)
            delta = project(delta + step * steepest_ascent(grad, self.norm), self.norm, self.epsilon)
            delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()

    def describe(self) -> str:
        eot = f", EoT {self.draws}" if self.draws > 1 else ""
        if (
            self.steps == 1
            and not self.random_start
            and self.norm == "linf"
            and (self.step_size == self.epsilon or self.epsilon == 0)
        ):
            return f"fgsm eps={self.epsilon:g}{eot}"
        return f"pgd-{self.norm} eps={self.epsilon:g}, {self.steps} steps{eot}"


def fgsm(epsilon: float, draws: int = 1) -> PGD:
    """FGSM: one step of size epsilon along sign(grad), from x."""
    return PGD("linf", epsilon, steps=1, step_size=epsilon if epsilon > 0 else None, random_start=False, draws=draws)


# ------------------------------------------------------- inner-loop adversarial training (Table 2)
def adversarial_training(epsilon: float = 0.1) -> PerturbationFactory:
    """MAML's inner steps on FGSM examples of the support set (size ``epsilon``; the paper uses
    0.1 and 0.3 on Omniglot, 0.01 and 0.1 on miniImageNet). No feature slot changes: the factory's
    ``support_attack`` is what the bilevel scheme applies to the support set of every inner step
    (the attack follows the deterministic model, as the query set sees it, and its direction is a
    constant for the meta-gradient)."""

    def make(info: LayerInfo) -> nn.Module:  # noqa: ARG001
        return FeaturePerturbation()

    # input gradients inside the inner steps: the loop strategy runs it
    return with_attributes(make, support_attack=fgsm(epsilon), vmap_safe=False)


register("adversarial")(adversarial_training)
