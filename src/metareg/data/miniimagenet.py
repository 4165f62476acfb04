"""miniImageNet (Vinyals et al., 2016; Ravi & Larochelle, 2017 split) as :class:`ClassImages`.

Expected layout (the one produced by Ravi & Larochelle's and Finn et al.'s preprocessing)::

    ROOT/images/<file>.jpg              84x84 RGB (other sizes are resized to ``image_size``)
    ROOT/train.csv, val.csv, test.csv   header ``filename,label``, one image per row

with 64 / 16 / 20 classes. The full data set has 600 images per class; subsets (e.g. 100 per class)
and classes of unequal size load unchanged: the episode sampler checks ``shot + query`` against
the smallest class. Classes keep the order of their first row in the csv, images the row order.

Images are stored as ``uint8`` ``[M, 3, H, W]``; they are resized (PIL LANCZOS, no aspect
preservation, as in the original preprocessing) only when their size differs from ``image_size``.
Each split is decoded once into the data cache (see :mod:`metareg.data.cache`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .cache import cache_key, cached_images, file_signature
from .classes import ClassImages
from .episodic import EpisodicDataset, register_episodic
from .images import decode_image
from .roots import check_root

__all__ = ["MINIIMAGENET_SPLITS", "load_miniimagenet"]

log = logging.getLogger(__name__)

MINIIMAGENET_SPLITS = ("train", "val", "test")
_LAYOUT = "ROOT/images/*.jpg plus ROOT/{train,val,test}.csv with a 'filename,label' header"


def _read_csv(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, filename, label)`` rows of a split csv, validated."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} ({exc}); restore the file ({_LAYOUT})") from None
    if not rows or [cell.strip().lower() for cell in rows[0]] != ["filename", "label"]:
        header = ",".join(rows[0]) if rows else "<empty file>"
        raise DataError(f"{path}: header is {header!r}, expected 'filename,label' (Ravi & Larochelle csv)")
    out: list[tuple[int, str, str]] = []
    seen: set[str] = set()
    for number, row in enumerate(rows[1:], 2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {number}: expected 'filename,label', got {','.join(row)!r}; fix the file")
        filename, label = row[0].strip(), row[1].strip()
        if filename in seen:
            raise DataError(f"{path} line {number}: {filename} is listed twice; fix the file")
        seen.add(filename)
        out.append((number, filename, label))
    if not out:
        raise DataError(f"{path} lists no images; restore the file ({_LAYOUT})")
    return out


def _decode(path: Path, image_size: int) -> np.ndarray:
    try:
        pixels = decode_image(path, "RGB", image_size)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode miniImageNet image {path} ({exc}); the file is corrupt: replace it") from None
    return pixels.transpose(2, 0, 1)


def load_miniimagenet(root: str | Path, split: str, image_size: int = 84, *, cache: bool = True) -> ClassImages:
    """Load one split (``train``, ``val`` or ``test``) of miniImageNet from ``root``.

    Returns a :class:`ClassImages` of ``uint8`` ``[M, 3, image_size, image_size]`` RGB images.
    """
    root = Path(root).expanduser()
    if split not in MINIIMAGENET_SPLITS:
        raise DataError(f"unknown miniImageNet split {split!r}; use one of {', '.join(MINIIMAGENET_SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"miniImageNet image_size must be a positive integer, got {image_size!r}")
    check_root(root, "miniImageNet", f"point it at a folder with {_LAYOUT}")
    csv_path, image_dir = root / f"{split}.csv", root / "images"
    if not csv_path.is_file():
        raise DataError(f"miniImageNet split file {csv_path} is missing; the root must hold {_LAYOUT}")
    if not image_dir.is_dir():
        raise DataError(f"miniImageNet image folder {image_dir} is missing; the root must hold {_LAYOUT}")

    rows = _read_csv(csv_path)
    digest = hashlib.sha256()
    for number, filename, _ in rows:
        try:
            st = (image_dir / filename).stat()
        except OSError:
            raise DataError(
                f"{csv_path} line {number}: image {image_dir / filename} is missing; restore it or remove the row"
            ) from None
        digest.update(f"{filename}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())

    class_names: list[str] = []
    class_of: dict[str, int] = {}
    members: list[list[int]] = []
    for i, (_, _, label) in enumerate(rows):
        if label not in class_of:
            class_of[label] = len(class_names)
            class_names.append(label)
            members.append([])
        members[class_of[label]].append(i)

    def build() -> tuple[Tensor, dict]:
        log.info("decoding %d miniImageNet images for %s (once; later loads use the cache)", len(rows), csv_path)
        out = np.empty((len(rows), 3, image_size, image_size), dtype=np.uint8)
        for i, (_, filename, _) in enumerate(rows):
            out[i] = _decode(image_dir / filename, image_size)
        return torch.from_numpy(out), {"rows": len(rows)}

    key = cache_key("miniimagenet", split, file_signature(csv_path), digest.hexdigest(), image_size)
    images, _ = cached_images(f"miniimagenet-{split}-{image_size}px", key, build, enabled=cache)
    return ClassImages(
        images=images,
        class_indices=[torch.tensor(m, dtype=torch.long) for m in members],
        class_names=class_names,
        dataset="miniimagenet",
        split=split,
    )


register_episodic(
    EpisodicDataset(
        "miniimagenet",
        load_miniimagenet,
        channels=3,
        image_size=84,
        needs_root=True,
        handled=("root", "split", "image_size"),
        description="miniImageNet, Ravi & Larochelle csv layout",
    )
)
