"""CUB-200-2011 as an episodic data set: Chen et al.'s (2019, CloserLookFewShot) 100/50/50 class
split, the cross-domain meta-test of DropGrad's Table 4 (meta-train on miniImageNet, meta-test on
CUB's novel classes).

Layout (the official archive, unpacked)::

    ROOT/CUB_200_2011/classes.txt                 "<id> <NNN.Name>", the 200 classes
    ROOT/CUB_200_2011/images/<NNN.Name>/*.jpg     the images of each class

``ROOT`` may also be the ``CUB_200_2011`` folder itself. The split is Chen et al.'s: the class
folders in sorted order (the order of ``classes.txt``), class i is ``train`` (their "base") if i is
even, ``val`` if i mod 4 = 1 and ``test`` (their "novel") if i mod 4 = 3: 100, 50 and 50 classes.
The official train/test image split (``train_test_split.txt``) is not used: few-shot splits divide
classes. Images are decoded to RGB and resized (LANCZOS, no aspect preservation, like our
miniImageNet) to ``image_size`` (default 84); CloserLookFewShot resizes to 1.15 x the size and
center-crops at test time instead. Each split is decoded once into the data cache.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .cache import cache_key, cached_images
from .classes import ClassImages
from .episodic import EpisodicDataset, register_episodic
from .images import decode_image

__all__ = ["CUB_SPLITS", "chen_split", "load_cub"]

log = logging.getLogger(__name__)

CUB_SPLITS = ("train", "val", "test")
CUB_CLASSES = 200
_LAYOUT = "CUB_200_2011/classes.txt and CUB_200_2011/images/<class>/*.jpg (the official archive)"
_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})


def chen_split(index: int) -> str:
    """The split of the ``index``-th class (0-based, sorted order) in Chen et al.'s CUB split."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def _base(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"CUB root {root} does not exist; point it at the folder holding {_LAYOUT}")
    for candidate in (root / "CUB_200_2011", root):
        if (candidate / "classes.txt").is_file() and (candidate / "images").is_dir():
            return candidate
    missing = (
        "classes.txt" if not any((c / "classes.txt").is_file() for c in (root, root / "CUB_200_2011")) else "images/"
    )
    raise DataError(f"CUB root {root} has no CUB_200_2011/{missing}; expected {_LAYOUT}")


def _class_names(base: Path) -> list[str]:
    """The class folder names listed in ``classes.txt``, sorted (Chen et al. sort the folders)."""
    path = base / "classes.txt"
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); restore it from the CUB-200-2011 archive") from None
    names = []
    for number, line in enumerate(lines, 1):
        parts = line.split(None, 1)
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path} line {number}: expected '<id> <class folder>', got {line.strip()!r}; fix the file")
        names.append(parts[1].strip())
    if len(names) != CUB_CLASSES or len(set(names)) != CUB_CLASSES:
        raise DataError(
            f"{path} lists {len(set(names))} distinct classes; Chen et al.'s split is defined on CUB's {CUB_CLASSES}"
        )
    return sorted(names)


def load_cub(root: str | Path, split: str, image_size: int = 84, *, cache: bool = True) -> ClassImages:
    """One split (``train``, ``val`` or ``test``) of CUB-200-2011 under Chen et al.'s class split,
    as ``uint8`` ``[M, 3, image_size, image_size]`` RGB images grouped by class."""
    if split not in CUB_SPLITS:
        raise DataError(f"unknown CUB split {split!r}; use one of {', '.join(CUB_SPLITS)} (Chen et al.'s classes)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"CUB image_size must be a positive integer, got {image_size!r}")
    base = _base(Path(root))
    names = [name for i, name in enumerate(_class_names(base)) if chen_split(i) == split]
    files: list[list[Path]] = []
    digest = hashlib.sha256()
    for name in names:
        folder = base / "images" / name
        if not folder.is_dir():
            raise DataError(f"CUB class folder {folder} (listed in classes.txt) is missing; restore it ({_LAYOUT})")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTENSIONS and not p.name.startswith("."))
        if not images:
            raise DataError(f"CUB class folder {folder} holds no images; restore it ({_LAYOUT})")
        files.append(images)
        for path in images:
            st = path.stat()
            digest.update(f"{name}/{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())

    def build() -> tuple[Tensor, dict]:
        count = sum(map(len, files))
        log.info("decoding %d CUB images for the %s split (once; later loads use the cache)", count, split)
        out = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
        row = 0
        for images in files:
            for path in images:
                try:
                    out[row] = decode_image(path, "RGB", image_size).transpose(2, 0, 1)
                except (OSError, ValueError, SyntaxError) as exc:
                    raise DataError(
                        f"cannot decode CUB image {path} ({exc}); the file is corrupt: replace it"
                    ) from None
                row += 1
        return torch.from_numpy(out), {"rows": count}

    key = cache_key("cub-episodic", split, digest.hexdigest(), image_size)
    pixels, _ = cached_images(f"cub-{split}-{image_size}px", key, build, enabled=cache)
    sizes = torch.tensor([len(f) for f in files])
    starts = torch.cumsum(sizes, 0) - sizes
    return ClassImages(
        images=pixels,
        class_indices=[torch.arange(int(s), int(s) + int(n)) for s, n in zip(starts, sizes)],
        class_names=names,
        dataset="cub",
        split=split,
    )


register_episodic(
    EpisodicDataset(
        "cub",
        load_cub,
        channels=3,
        image_size=84,
        needs_root=True,
        handled=("root", "split", "image_size"),
        description="CUB-200-2011, Chen et al.'s 100/50/50 class split (official archive layout)",
    )
)
