"""Batches for ordinary training: epoch order, random crop and horizontal flip, normalization.

Written with torch ops on whole batches (no per-image Python, no torchvision). The transforms of
the MetaPerturb experiments: zero-pad by ``padding`` pixels and crop back to the original size at a
random offset, flip horizontally with probability 1/2, then map pixels from [0, 255] to [-1, 1]
(normalization with mean 0.5 and std 0.5). Grayscale images become 3 identical channels
(:func:`to_channels`), as the reference feeds them to RGB networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from ..seeds import generator
from .labeled import LabeledImages


def epoch_batch(num_examples: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of batch ``step``: epochs are fixed random permutations (seeded by ``seed`` and the
    epoch), cut into ``num_examples // batch_size`` full batches (the last partial one is dropped)."""
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise DataError(f"batch size {batch_size} exceeds the {num_examples} training examples; lower the batch size")
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=generator(seed, epoch))
    return order[i * batch_size : (i + 1) * batch_size]


def random_crop_flip(images: Tensor, padding: int, flip: bool, g: torch.Generator) -> Tensor:
    """Random ``padding``-pixel zero-padded crops (and horizontal flips) of ``images`` [N, C, H, W]."""
    n, _, height, width = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(height))[:, :, None]  # [N, H, 1]
        cols = (dx[:, None] + torch.arange(width))[:, None, :]  # [N, 1, W]
        images = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirrored = torch.rand(n, generator=g) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    return images


def normalize(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [0, 255] (or floating-point pixels in [0, 1], e.g. attacked images) -> [-1, 1]."""
    if images.is_floating_point():
        return images.to(dtype) * 2.0 - 1.0
    return images.to(dtype) / 127.5 - 1.0


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Grayscale to ``channels`` identical channels; other images unchanged (checked)."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    raise DataError(f"images have {images.shape[1]} channels; the network takes {channels}")


def padding_for(image_size: int) -> int:
    """The crop padding of the MetaPerturb reference: 4 pixels at 32x32, 8 otherwise."""
    return 4 if image_size <= 32 else 8


def training_batch(
    data: LabeledImages, batch_size: int, step: int, seed: int, *, augment: bool, channels: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Batch ``step`` of ``data`` (epoch order seeded by ``seed``), cropped and flipped if
    ``augment``, normalized to [-1, 1] with ``channels`` channels."""
    index = epoch_batch(len(data), batch_size, step, seed)
    images = to_channels(data.images[index], channels)
    if augment:
        images = random_crop_flip(images, padding_for(images.shape[-1]), True, generator(seed, step))
    return normalize(images, dtype), data.labels[index]
