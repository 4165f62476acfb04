"""Glyphs: a generated, Omniglot-like few-shot image data set that needs no files.

Every class is a random "character" made of 2 to 4 pen strokes; every instance is that character
drawn again by an unsteady hand. Everything is drawn with torch from a seed, in a few seconds.

A class (per split, from its own random stream) draws:

* the number of strokes (2: 35 %, 3: 40 %, 4: 25 %);
* per stroke, a cubic Bezier curve from a start point to an end point 0.25..0.6 glyph-widths away,
  whose two inner control points are pushed sideways to make a straight line, an arc (both pushed
  the same way), an S-curve (opposite ways) or a free curve; 60 % of the strokes after the first
  start on the previous stroke (at its start, middle or end), as pen strokes of a letter do;
* a size (the glyph's larger side spans 55..70 % of the image, centred) and a pen width.

An instance perturbs its class: every control point moves by N(0, 0.045 image widths), the glyph
gets a random affine map (rotation N(0, 12 deg), per-axis scale exp N(0, 0.1), shear N(0, 0.1),
shift N(0, 0.05)), and the pen width varies by +-15 %. The strokes are rendered anti-aliased (each as a
line integral of a Gaussian pen, which separates into one small matrix product per image), ink
bright on a black background as for Omniglot, and stored as ``uint8`` ``[M, 1, S, S]``.

Splits draw their classes from separate random streams derived from ``(seed, split)``: ``train``
(1200 classes by default), ``val`` (200) and ``test`` (400) are different characters, and
``trainval`` is ``train`` followed by ``val``. A class's shapes do not depend on ``image_size``.

Difficulty (for calibration): a nearest-neighbour classifier on raw pixels reaches about 62 % on
5-way 1-shot test episodes and 82 % on 5-way 5-shot (chance 20 %; the same classifier gets 46 % and
67 % on Omniglot's Vinyals test split), so the classes are distinguishable but the instances vary.
Generating the 24,000 train images takes about 2 s on two CPU cores.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from ..errors import DataError
from ..memory import require
from .classes import ClassImages
from .episodic import EpisodicDataset, register_episodic

__all__ = ["GLYPH_SPLITS", "load_glyphs"]

#: Default number of classes per split.
GLYPH_SPLITS = {"train": 1200, "val": 200, "test": 400}

_MAX_STROKES = 4
_STROKE_COUNT_PROBS = (0.35, 0.40, 0.25)  # 2, 3, 4 strokes
_SEGMENTS = 16  # line segments per rendered stroke
_CHUNK = 2048  # images rendered at once


def _stream(seed: int, split: str) -> torch.Generator:
    digest = hashlib.sha256(f"metareg-glyphs:{seed}:{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


def _bezier(ctrl: Tensor, t: Tensor) -> Tensor:
    """Points of cubic Beziers: ``ctrl [..., 4, 2]``, ``t [T]`` -> ``[..., T, 2]``."""
    t = t.reshape(-1, 1)
    u = 1 - t
    basis = torch.stack([u**3, 3 * u**2 * t, 3 * u * t**2, t**3], dim=-2)  # [T, 4, 1]
    return (ctrl.unsqueeze(-3) * basis).sum(-2)


def _classes(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Class prototypes: control points ``[n, S, 4, 2]`` (unit square), stroke mask ``[n, S]``, pen width ``[n]``."""
    s = _MAX_STROKES

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    count = 2 + torch.multinomial(torch.tensor(_STROKE_COUNT_PROBS), n, replacement=True, generator=g)
    active = torch.arange(s) < count.unsqueeze(1)  # [n, S]

    # Start and end points, strokes after the first often attached to the previous one.
    free_start = 0.15 + 0.7 * rand(n, s, 2)
    attach = rand(n, s) < 0.6
    attach_t = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (n, s), generator=g)]
    angle = 2 * math.pi * rand(n, s)
    length = 0.25 + 0.35 * rand(n, s)
    kind = torch.randint(0, 4, (n, s), generator=g)  # 0 line, 1 arc, 2 S-curve, 3 free curve
    bend = (0.3 + 0.4 * rand(n, s)) * torch.where(rand(n, s) < 0.5, -1.0, 1.0)
    free_bend = 0.35 * torch.randn(n, s, 2, generator=g)
    h1 = torch.where(kind == 0, 0.0, torch.where(kind == 3, free_bend[..., 0], bend))
    h2 = torch.where(kind == 0, 0.0, torch.where(kind == 1, bend, torch.where(kind == 2, -bend, free_bend[..., 1])))

    strokes: list[Tensor] = []
    for i in range(s):
        start = free_start[:, i]
        if i > 0:
            t, u = attach_t[:, i, None], 1 - attach_t[:, i, None]
            prev = strokes[-1]  # [n, 4, 2]
            on_previous = u**3 * prev[:, 0] + 3 * u**2 * t * prev[:, 1] + 3 * u * t**2 * prev[:, 2] + t**3 * prev[:, 3]
            start = torch.where(attach[:, i : i + 1], on_previous, start)
        direction = torch.stack([torch.cos(angle[:, i]), torch.sin(angle[:, i])], -1)
        end = (start + length[:, i : i + 1] * direction).clamp(0.05, 0.95)
        chord = end - start
        normal = torch.stack([-chord[:, 1], chord[:, 0]], -1)
        p1 = start + chord / 3 + h1[:, i : i + 1] * normal
        p2 = start + 2 * chord / 3 + h2[:, i : i + 1] * normal
        strokes.append(torch.stack([start, p1, p2, end], dim=1))
    ctrl = torch.stack(strokes, dim=1)  # [n, S, 4, 2]

    # Centre each glyph and scale its larger side to 55..70 % of the image.
    pts = _bezier(ctrl, torch.linspace(0, 1, 17))  # [n, S, 17, 2]
    big = torch.tensor(float("inf"))
    lo = torch.where(active[..., None, None], pts, big).amin(dim=(1, 2))
    hi = torch.where(active[..., None, None], pts, -big).amax(dim=(1, 2))
    extent = (hi - lo).amax(-1).clamp_min(1e-3)
    scale = (0.55 + 0.15 * rand(n)) / extent
    ctrl = (ctrl - ((lo + hi) / 2)[:, None, None]) * scale[:, None, None, None] + 0.5
    width = 0.65 + 0.3 * rand(n)  # Gaussian pen sigma, in pixels of a 28-pixel image
    return ctrl, active, width


def _instances(ctrl: Tensor, width: Tensor, per_class: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Perturbed copies: control points ``[n, I, S, 4, 2]`` and pen widths ``[n, I]``."""
    n, s = ctrl.shape[:2]
    shape = (n, per_class)
    pts = ctrl.unsqueeze(1) + 0.045 * torch.randn(n, per_class, s, 4, 2, generator=g)
    rot = math.radians(12.0) * torch.randn(shape, generator=g)
    scale = torch.exp(0.1 * torch.randn(n, per_class, 2, generator=g))
    shear = 0.1 * torch.randn(shape, generator=g)
    shift = 0.05 * torch.randn(n, per_class, 2, generator=g)
    cos, sin = torch.cos(rot), torch.sin(rot)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, I, 2, 2]
    shearing = torch.eye(2).repeat(n, per_class, 1, 1)
    shearing[..., 0, 1] = shear
    affine = rotation @ shearing @ torch.diag_embed(scale)
    centred = pts - 0.5
    moved = torch.einsum("nirc,nisjc->nisjr", affine, centred) + 0.5 + shift[:, :, None, None]
    pen = width.unsqueeze(1) * (0.85 + 0.3 * torch.rand(shape, generator=g))
    return moved, pen


def _render(ctrl: Tensor, active: Tensor, pen: Tensor, size: int) -> Tensor:
    """Draw strokes: ``ctrl [M, S, 4, 2]`` (unit square, x then y), ``active [M, S]``, ``pen [M]``
    -> ``uint8 [M, size, size]``.

    Each stroke is a polyline of short segments; a segment of length ``l`` at midpoint ``m`` adds
    ``l * N(pixel; m, sigma^2 I)`` scaled so that a long stroke's centre line has intensity 1.
    The sum separates: ``image = Gy^T diag(weight) Gx`` with one Gaussian row per segment.
    """
    sigma = (pen * size / 28.0).clamp_min(0.3)  # [M] in pixels
    pts = _bezier(ctrl, torch.linspace(0, 1, _SEGMENTS + 1)) * size  # [M, S, T+1, 2] in pixels
    mid = (pts[:, :, 1:] + pts[:, :, :-1]) / 2
    seg = (pts[:, :, 1:] - pts[:, :, :-1]).norm(dim=-1)  # [M, S, T]
    weight = seg * active.unsqueeze(-1) / (math.sqrt(2 * math.pi) * sigma[:, None, None])
    mid, weight = mid.flatten(1, 2), weight.flatten(1)  # [M, P, 2], [M, P]
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    inv = (-0.5 / sigma**2)[:, None, None]
    gx = torch.exp(inv * (centres - mid[..., 0:1]) ** 2)  # [M, P, size]
    gy = torch.exp(inv * (centres - mid[..., 1:2]) ** 2)
    ink = torch.bmm((gy * weight.unsqueeze(-1)).transpose(1, 2), gx)  # [M, y, x]
    ink = 1.0 - torch.exp(-2.0 * ink)  # saturate where strokes cross; centre line ~0.86
    return (ink / (1.0 - math.exp(-2.0))).clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _generate(split: str, n_classes: int, per_class: int, image_size: int, seed: int) -> Tensor:
    g = _stream(seed, split)
    ctrl, active, width = _classes(n_classes, g)
    inst, pen = _instances(ctrl, width, per_class, g)
    inst = inst.flatten(0, 1)
    act = active.repeat_interleave(per_class, dim=0)
    pen = pen.flatten()
    out = torch.empty(inst.shape[0], 1, image_size, image_size, dtype=torch.uint8)
    for i in range(0, inst.shape[0], _CHUNK):
        j = i + _CHUNK
        out[i:j, 0] = _render(inst[i:j], act[i:j], pen[i:j], image_size)
    return out


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"glyphs: {name} must be a positive integer, got {value!r}")
    return value


def load_glyphs(
    split: str,
    image_size: int = 28,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    instances_per_class: int = 20,
) -> ClassImages:
    """Generate one split of the glyph data set (see the module docstring).

    Args:
        split: ``train``, ``val``, ``test`` or ``trainval`` (= train + val).
        image_size: side of the square images in pixels.
        seed: data set seed; the same seed gives the same classes and images.
        num_classes: classes in the split (default 1200 / 200 / 400 for train / val / test; for
            ``trainval``, the number of train classes, val keeping its default).
        instances_per_class: images per class.

    Returns:
        A :class:`ClassImages` of ``uint8`` ``[M, 1, image_size, image_size]`` images, ink bright.
    """
    valid = (*GLYPH_SPLITS, "trainval")
    if split not in valid:
        raise DataError(f"unknown glyphs split {split!r}; use one of {', '.join(valid)}")
    _positive(image_size, "image_size")
    _positive(instances_per_class, "instances_per_class")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"glyphs: seed must be an integer, got {seed!r}")
    parts = ("train", "val") if split == "trainval" else (split,)
    counts = [GLYPH_SPLITS[p] for p in parts]
    if num_classes is not None:
        counts[0] = _positive(num_classes, "num_classes")
    count = sum(counts) * instances_per_class
    require(  # the uint8 images alone (their strokes' control points take more)
        count * image_size * image_size,
        f"glyphs {split} ({sum(counts)} classes x {instances_per_class} instances_per_class: {count} images of "
        f"{image_size}x{image_size} pixels)",
        fix="lower num_classes or instances_per_class (data.options)",
    )

    images = torch.cat([_generate(p, n, instances_per_class, image_size, seed) for p, n in zip(parts, counts)])
    total = sum(counts)
    rows = torch.arange(total * instances_per_class).reshape(total, instances_per_class)
    names = [f"{p}{i:04d}" for p, n in zip(parts, counts) for i in range(n)]
    return ClassImages(
        images=images,
        class_indices=list(rows),
        class_names=names,
        dataset="glyphs",
        split=split,
    )


register_episodic(
    EpisodicDataset(
        "glyphs",
        load_glyphs,
        channels=1,
        image_size=28,
        handled=("split", "image_size", "seed"),
        description="generated Omniglot-like characters (built in, no files)",
    )
)
