"""Decoding one image file to a fixed-size uint8 array."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError


def decode_image(source: bytes | str | Path, mode: str, image_size: int) -> np.ndarray:
    """Decode ``source`` (file path or bytes) in PIL ``mode`` ("L" or "RGB"), resized to
    ``image_size`` x ``image_size`` with LANCZOS if needed; ``[H, W]`` or ``[H, W, 3]`` uint8.
    Raises ``OSError``/``ValueError``/``SyntaxError`` on a corrupt file (callers name the file), and
    :class:`~metareg.errors.DataError` for a file that exists but may not be read (that is not
    corruption, and saying so would send the user to download the data again)."""
    if not isinstance(source, bytes):
        try:
            source = Path(source).read_bytes()
        except PermissionError:
            raise DataError(
                f"cannot read image {source}: permission denied; make the data readable (chmod -R a+r on its folder)"
            ) from None
    with Image.open(io.BytesIO(source)) as im:
        im = im.convert(mode)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)
