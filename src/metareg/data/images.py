"""Decoding one image file to a fixed-size uint8 array."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def decode_image(source: bytes | Path, mode: str, image_size: int) -> np.ndarray:
    """Decode ``source`` (file path or bytes) in PIL ``mode`` ("L" or "RGB"), resized to
    ``image_size`` x ``image_size`` with LANCZOS if needed; ``[H, W]`` or ``[H, W, 3]`` uint8.
    Raises ``OSError``/``ValueError``/``SyntaxError`` on a corrupt file (callers name the file)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        im = im.convert(mode)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)
