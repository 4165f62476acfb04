"""MetaPerturb (Ryu, Shin, Lee & Hwang, NeurIPS 2020): one tiny perturbation function phi, shared by
every layer of every network, that multiplies a CNN's feature maps h (shape [B, C, H, W]).

Paper Section 3.2 (Figure 2) in code:

==========================================================  =============================================
paper                                                       code
==========================================================  =============================================
channel-equivariant op: lambda (self-to-self, 3x3) and      :class:`EquivariantConv`:
gamma (all-to-self, 3x3), phi' = lambda I + gamma 1 1^T     ``out_c = lambda * h_c + gamma * mean_c' h_c'``
mu_phi(h): two of them with a ReLU between                  :meth:`MetaPerturbFunction.noise_mean`
z = Softplus(a), a ~ N(mu_phi(h), I)  (Eq. 1)               :meth:`MetaPerturbFunction.noise`
scale s in [0, 1]^C: shared convolutions, ReLU, GAP,        :meth:`MetaPerturbFunction.channel_features`
batch mean and variance, layer information C and W,         (4 shared 3x3 kernels per channel), then
a shared affine map and a sigmoid                           :meth:`MetaPerturbFunction.scale`
running averages of the batch statistics at test time       :class:`MetaPerturb` buffers ``running_mean``,
                                                            ``running_var`` (momentum 0.1, like batch norm)
g_phi(h) = s o z  (Eq. 2), multiplied into h                :meth:`MetaPerturb.forward`
clipping the perturbed features with k (k = 100)            ``MetaPerturbFunction.clip`` (upper bound)
==========================================================  =============================================

Facts from the authors' released implementation that the paper does not state, followed here:
the all-to-self term convolves the *mean* over channels (so the function does not depend on C);
the channel statistics are 4-dimensional; the affine map has 2 * 4 + 2 inputs and no bias; every
parameter of phi starts normal with std 0.01; layer information enters as C / C_norm and
H / H_norm, where the network fixes C_norm (its widest perturbed layer) and H_norm (its input
size); noise strength c anneals the perturbation as h * ((s o z - 1) c + 1), so c = 0 is the
identity and c = 1 is Eq. 2; noise is sampled at test time too (predictions are Monte-Carlo
averaged); clipping bounds the perturbed features from above only. That is 2 * (9 + 9) + 4 * 9 +
10 = 82 parameters.

Deliberate deviation: the running variance accumulates the same unbiased batch variance that the
scale sees in training; the released code multiplies it by a further B / (B - 1).

The ablations of the paper's Table 3 are options of the same function and slots, not copies:
``scale=False`` (row "w/o channel-wise scaling s": s = 1), ``noise=False`` ("w/o stochastic noise
z": z = 1), and :func:`metaperturb_slots`'s ``location`` (Table 3(b)): ``before-pooling`` (only the
layers whose feature map is next reduced: a max-pool, a stride-2 layer or the global average pooling;
in ResNet20 the last block of each stage), ``top`` / ``bottom`` (the last / first third of the blocks,
rounded up: in ResNet20 its last / first stage; the paper does not say how many layers it used).
The other slots are the identity. Neither released code nor paper gives these details: they are ours.

One :class:`MetaPerturbFunction` (phi) serves many :class:`MetaPerturb` slots (one per perturbed
layer, each with its own running statistics). A slot *refers* to phi without owning it, so phi's
82 parameters appear once in whatever module owns it: the network (``create_model`` registers the
factory's ``shared`` function as ``perturbation_function``) or the :class:`~metareg.perturb.attach.Perturbed`
wrapper of a user's model.

It is a registered perturbation like every other (``build_perturbation("metaperturb", {"phi":
"builtin" | "learned" | RUN})``, registered in :mod:`.pretrained`, beside the stored phis), so it fills the
slots of any backbone in any scheme: ordinary
training with a frozen phi (the paper's meta-test, Algorithm 2), the joint scheme learning phi
(Algorithm 1), or the bilevel scheme learning phi through MAML's inner loop. In episodic networks
(``LayerInfo.running_stats`` false, batch norm on batch statistics always) the scale s uses the
batch's statistics at test time too, like their batch norm. ``sample=False`` uses a = mu (the
bilevel scheme's query pass); ordinary training samples at test time too (MC-averaged predictions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.layers import copies
from ..nets.slots import (
    FeaturePerturbation,
    LayerInfo,
    PerturbationFactory,
    current_record,
    with_attributes,
)

NUM_STATS = 4  # channel statistics per channel: four shared 3x3 kernels
INIT_STD = 0.01


def _per_channel_conv(h: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every channel of ``h`` [B, C, H, W] with the same ``kernel`` [1, 1, k, k] ('same'
    padding), as one depthwise convolution. (Measured on CPU: 8x faster than folding the channels
    into the batch; one depthwise convolution per kernel is 2.5x faster than one with several
    outputs per channel.)"""
    return F.conv2d(
        h, kernel.expand(h.shape[1], 1, *kernel.shape[-2:]), padding=kernel.shape[-1] // 2, groups=h.shape[1]
    )


class EquivariantConv(nn.Module):
    """A channel-permutation-equivariant 3x3 operation (Zaheer et al.'s lambda I + gamma 1 1^T for
    convolutions): ``out_c = lambda * h_c + gamma * mean_c' h_c'``, 18 parameters."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.self_kernel = nn.Parameter(torch.empty(1, 1, kernel_size, kernel_size))  # lambda
        self.all_kernel = nn.Parameter(torch.empty(1, 1, kernel_size, kernel_size))  # gamma
        nn.init.normal_(self.self_kernel, std=INIT_STD)
        nn.init.normal_(self.all_kernel, std=INIT_STD)

    def forward(self, h: Tensor) -> Tensor:
        own = _per_channel_conv(h, self.self_kernel)
        shared = F.conv2d(h.mean(1, keepdim=True), self.all_kernel, padding=self.all_kernel.shape[-1] // 2)
        return own + shared


class MetaPerturbFunction(nn.Module):
    """phi: the 82 meta-learned parameters, and the settings every layer shares.

    Settings (plain attributes, not learned, not saved): ``strength`` c in [0, 1] (annealing; set by
    :meth:`set_training_progress` from ``anneal``, the fraction of training over which c rises
    linearly from 0 to 1; 0: always 1), ``clip`` k (``None``: no clipping).
    """

    is_perturbation = True

    def __init__(self, *, clip: float | None = 100.0, anneal: float = 0.0, scale: bool = True, noise: bool = True):
        super().__init__()
        self.noise1 = EquivariantConv()
        self.noise2 = EquivariantConv()
        self.stat_kernels = nn.Parameter(torch.empty(NUM_STATS, 1, 3, 3))
        self.scale_map = nn.Linear(2 * NUM_STATS + 2, 1, bias=False)
        nn.init.normal_(self.stat_kernels, std=INIT_STD)
        nn.init.normal_(self.scale_map.weight, std=INIT_STD)
        self.strength = 1.0
        self.anneal = anneal
        self.clip = clip
        self.use_scale, self.use_noise = scale, noise  # Table 3(a) ablations: s = 1, z = 1

    @property
    def scheduled(self) -> bool:
        return self.anneal > 0

    def set_training_progress(self, fraction: float) -> None:
        """c = min(1, fraction / anneal): 0 at the start, full strength after ``anneal`` of training."""
        self.strength = 1.0 if self.anneal <= 0 else min(1.0, fraction / self.anneal)

    def noise_mean(self, h: Tensor) -> Tensor:
        """mu_phi(h), shaped like ``h``."""
        return self.noise2(F.relu(self.noise1(h)))

    def noise(self, h: Tensor, sample: bool) -> Tensor:
        """z = Softplus(a), a ~ N(mu_phi(h), I) (Eq. 1); a = mu_phi(h) when not sampling; z = 1
        without noise (the Table 3 ablation)."""
        if not self.use_noise:
            return torch.ones_like(h)
        a = self.noise_mean(h)
        return F.softplus(a + torch.randn_like(a) if sample else a)

    def channel_features(self, h: Tensor) -> Tensor:
        """GAP(ReLU(K * h_c)) for each example and channel: [B, C, 4]."""
        return torch.stack(
            [F.relu(_per_channel_conv(h, kernel[None])).mean((-2, -1)) for kernel in self.stat_kernels], dim=-1
        )

    def scale(self, mean: Tensor, var: Tensor, channel_ratio: float, size_ratio: float) -> Tensor:
        """s in [0, 1]^C from the channel statistics [C, 4] and the layer information."""
        layer = mean.new_tensor([channel_ratio, size_ratio]).expand(mean.shape[0], 2)
        return torch.sigmoid(self.scale_map(torch.cat([mean, var, layer], dim=1))).squeeze(1)

    def extra_repr(self) -> str:
        ablated = ("" if self.use_scale else ", s=1") + ("" if self.use_noise else ", z=1")
        return f"strength={self.strength}, anneal={self.anneal}, clip={self.clip}{ablated}"


class MetaPerturb(FeaturePerturbation):
    """MetaPerturb at one layer with ``channels`` channels: h -> h o g_phi(h) (Eq. 2).

    In training mode the scale s uses the batch's channel statistics and updates this layer's
    running averages (buffers, so they are saved, loaded and moved with the model); in eval mode
    it uses the running averages, like batch norm. ``running_stats=False`` (episodic networks):
    always the batch's statistics, no running averages. ``channel_norm`` and ``spatial_norm`` are
    the network's fixed normalizers of C and H; ``height`` is the layer's feature-map height (for
    :meth:`running_scales`; the forward pass uses the actual height).
    """

    position = "norm"  # after batch norm (or the residual sum), before the ReLU
    function: MetaPerturbFunction  # a plain reference, set with object.__setattr__ (not a submodule)
    running_mean: Tensor  # buffers, registered with running_stats
    running_var: Tensor

    def __init__(
        self,
        function: MetaPerturbFunction,
        channels: int,
        channel_norm: float,
        spatial_norm: float,
        momentum: float = 0.1,
        height: int | None = None,
        running_stats: bool = True,
        index: int = 0,
    ):
        super().__init__()
        if channels < 1 or channel_norm <= 0 or spatial_norm <= 0:
            raise ConfigError(
                f"MetaPerturb needs positive channels and normalizers, got {channels}, {channel_norm}, {spatial_norm}"
            )
        object.__setattr__(self, "function", function)  # a reference: phi is owned elsewhere
        self.channels = channels
        self.channel_norm = float(channel_norm)
        self.spatial_norm = float(spatial_norm)
        self.momentum = momentum
        self.height = height
        self.index = index  # the block it perturbs (for its diagnostics)
        self.running_stats = running_stats
        if running_stats:
            self.register_buffer("running_mean", torch.zeros(channels, NUM_STATS))
            self.register_buffer("running_var", torch.ones(channels, NUM_STATS))

    def statistics(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Batch mean and (unbiased) variance of the channel features in training (updating the
        running averages), the running averages in eval mode (always the batch's without them)."""
        if self.running_stats and not self.training:
            return self.running_mean, self.running_var
        count = copies()
        if h.shape[0] < 2 * count:
            raise ConfigError("MetaPerturb's batch statistics need at least 2 images per batch in training mode")
        features = self.function.channel_features(h)
        if count > 1:  # stacked independent copies (batched Monte-Carlo samples): statistics per copy
            if self.running_stats and self.training:
                raise ConfigError(
                    "stacked copies of a batch are for episodic networks, whose MetaPerturb keeps no running statistics"
                )
            features = features.view(count, -1, *features.shape[1:])
            return features.mean(1), features.var(1)
        mean, var = features.mean(0), features.var(0)
        if self.running_stats and self.training:
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        return mean, var

    def scales(self, h: Tensor) -> Tensor:
        """s for the batch ``h`` (training) or from the running statistics (eval): [C], or [S, C] for
        S stacked copies; all ones without the scale (the Table 3 ablation)."""
        if not self.function.use_scale:
            return h.new_ones(h.shape[1])
        mean, var = self.statistics(h)
        if mean.dim() == 3:
            return torch.stack(
                [
                    self.function.scale(m, v, h.shape[1] / self.channel_norm, h.shape[2] / self.spatial_norm)
                    for m, v in zip(mean, var)
                ]
            )
        return self.function.scale(mean, var, h.shape[1] / self.channel_norm, h.shape[2] / self.spatial_norm)

    @torch.no_grad()
    def running_scales(self) -> Tensor:
        """s from the running statistics (what the layer uses at test time), [C]."""
        if self.height is None or not self.running_stats:
            raise ConfigError("this slot keeps no running statistics of a known feature-map height")
        return self.function.scale(
            self.running_mean, self.running_var, self.channels / self.channel_norm, self.height / self.spatial_norm
        )

    def forward(self, h: Tensor, layer_input: Tensor | None = None, *, sample: bool = False) -> Tensor:  # noqa: ARG002
        if h.dim() != 4 or h.shape[1] != self.channels:
            raise ConfigError(f"MetaPerturb at a {self.channels}-channel layer got features of shape {tuple(h.shape)}")
        phi = self.function
        z = phi.noise(h, sample)
        s = self.scales(h)
        s = s.repeat_interleave(h.shape[0] // s.shape[0], dim=0) if s.dim() == 2 else s.view(1, -1)
        g = s[:, :, None, None] * z
        record = current_record()
        if (
            record is not None
        ):  # how strongly it acts: the mean noise z and scale s of this block (logged by the trainers)
            record.metrics[f"z{self.index}"] = z.detach().mean()
            record.metrics[f"s{self.index}"] = s.detach().mean()
        out = h * ((g - 1) * phi.strength + 1) if phi.strength != 1.0 else h * g
        return out if phi.clip is None else out.clamp(max=phi.clip)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_norm={self.channel_norm:g}, spatial_norm={self.spatial_norm:g}"


LOCATIONS = ("all", "before-pooling", "top", "bottom")


def perturbed_here(info: LayerInfo, location: str) -> bool:
    """Whether a hidden layer gets a slot under ``location`` (Table 3(b)): every one (``all``), those
    whose feature map is next reduced (``before-pooling``), the last or first third of the layers,
    rounded up (``top``, ``bottom``)."""
    if location == "all":
        return True
    if location == "before-pooling":
        return info.before_pooling
    if info.layers is None:
        raise ConfigError(f"MetaPerturb location {location!r} needs a backbone that counts its layers (a built-in one)")
    third = -(-info.layers // 3)
    return info.index >= info.layers - third if location == "top" else info.index < third


def metaperturb_slots(function: MetaPerturbFunction, location: str = "all") -> PerturbationFactory:
    """A factory of :class:`MetaPerturb` slots sharing ``function``: one per hidden conv layer that
    ``location`` selects (:func:`perturbed_here`; the others and the output layer get the identity);
    the factory's ``shared`` is the function."""
    if location not in LOCATIONS:
        raise ConfigError(f"MetaPerturb location must be one of {', '.join(LOCATIONS)}, got {location!r}")

    def make(info: LayerInfo) -> nn.Module:
        if info.output or not perturbed_here(info, location):
            return FeaturePerturbation()
        if info.kind != "conv" or info.network_width is None or info.input_size is None:
            raise ConfigError(
                f"MetaPerturb perturbs convolutional feature maps [B, C, H, W]; layer {info.index} is {info.kind}"
            )
        return MetaPerturb(
            function,
            info.out_features,
            info.network_width,
            info.input_size,
            height=info.size,
            running_stats=info.running_stats,
            index=info.index,
        )

    # predictions are Monte-Carlo averages over the noise (Algorithm 2)
    return with_attributes(make, shared=function, sample_at_test=True)
