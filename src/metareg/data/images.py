"""Decoding one image file to a fixed-size uint8 array."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError, one_line


def too_large(name: object, error: BaseException) -> DataError:
    """The one line for an image PIL refuses to decode as a decompression bomb (say 20000 x 20000
    pixels: gigabytes once decoded), naming the file."""
    return DataError(
        f"image {name} is too large to decode ({one_line(error)}); replace it by an image of ordinary size"
    )


def decode_image(source: bytes | str | Path, mode: str, image_size: int, *, name: object = None) -> np.ndarray:
    """Decode ``source`` (file path or bytes) in PIL ``mode`` ("L" or "RGB"), resized to
    ``image_size`` x ``image_size`` with LANCZOS if needed; ``[H, W]`` or ``[H, W, 3]`` uint8.
    Raises ``OSError``/``ValueError``/``SyntaxError`` on a corrupt file (callers name the file), and
    :class:`~metareg.errors.DataError` for a file that exists but may not be read (that is not
    corruption, and saying so would send the user to download the data again) or that is too large
    to decode (``name``: the file, for bytes)."""
    name = name if name is not None or isinstance(source, bytes) else source
    if not isinstance(source, bytes):
        path = source
        try:
            source = Path(path).read_bytes()
        except PermissionError:
            raise DataError(
                f"cannot read image {path}: permission denied; make the data readable (chmod -R a+r on its folder)"
            ) from None
    try:
        with Image.open(io.BytesIO(source)) as file:
            im = file.convert(mode)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise too_large(name, err) from None
