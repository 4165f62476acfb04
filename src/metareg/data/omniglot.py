"""Omniglot (Lake et al., 2015) as :class:`~metareg.data.classes.ClassImages`.

The data root holds the two official archives, as downloaded from
https://github.com/brendenlake/omniglot/tree/master/python (or with ``metareg download omniglot``)::

    ROOT/images_background.zip     30 alphabets, 964 characters, 20 drawings each
    ROOT/images_evaluation.zip     20 alphabets, 659 characters, 20 drawings each

or the same trees extracted (``ROOT/images_background/<Alphabet>/characterNN/<id>_<drawer>.png``).

Images are read as grayscale, resized to ``image_size`` x ``image_size`` with PIL's LANCZOS filter
(as in Finn et al.'s MAML preprocessing; the 1-bit PNGs are first converted to 8-bit so that the
filter really anti-aliases: PIL silently falls back to nearest-neighbour on 1-bit images) and
inverted, so that the background is 0 and the ink is bright (1.0), as in most MAML code.

Class splits:

* ``class_split="vinyals"`` (default): the split of Vinyals et al. (2016) used by MAML and its
  successors. ``split`` is ``train`` (4112 classes), ``val`` (688), ``trainval`` (4800) or ``test``
  (1692); a class is a character at one of four rotations (``Latin/character01/rot090``), and a
  split mixes characters from both archives. The lists are read from
  ``ROOT/splits/vinyals/<split>.txt`` when present, else from the copy shipped with metareg.
* ``class_split="alphabets"``: Lake et al.'s original split, ``train``/``background`` = the 964
  background characters, ``test``/``evaluation`` = the 659 evaluation characters, each at all four
  rotations (3856 and 2636 classes).

Rotated classes reuse their character's images (rotated when sampled, counter-clockwise like
``np.rot90``). Each archive is decoded once into the data cache (see :mod:`metareg.data.cache`).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
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

__all__ = ["ALPHABET_SPLITS", "OMNIGLOT_ARCHIVES", "OMNIGLOT_HOME", "VINYALS_SPLITS", "load_omniglot"]

log = logging.getLogger(__name__)

OMNIGLOT_ARCHIVES = ("images_background", "images_evaluation")
OMNIGLOT_HOME = "https://github.com/brendenlake/omniglot/tree/master/python"
VINYALS_SPLITS = ("train", "val", "trainval", "test")
ALPHABET_SPLITS = {
    "train": "images_background",
    "background": "images_background",
    "test": "images_evaluation",
    "evaluation": "images_evaluation",
}
ROTATIONS = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}
_SPLIT_LINE = re.compile(r"^([^/]+/[^/]+)/(rot000|rot090|rot180|rot270)$")


def _how_to_get(root: Path) -> str:
    return (
        f"get it with `metareg download omniglot --to {root}` or download images_background.zip and "
        f"images_evaluation.zip from {OMNIGLOT_HOME} into that folder"
    )


@dataclass
class _Archive:
    """The decoded images of one official archive, grouped by character (contiguous rows)."""

    images: Tensor  # uint8 [M, 1, S, S]
    characters: list[str]  # "Alphabet/characterNN"
    counts: list[int]


def _decode(data: bytes | Path, image_size: int, label: str) -> np.ndarray:
    try:
        pixels = decode_image(data, "L", image_size, name=label)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"cannot decode Omniglot image {label} ({exc}); the file is corrupt: download the data again"
        ) from None
    return 255 - pixels  # ink bright, background 0


def _group(files: list[tuple[str, str]]) -> tuple[list[str], list[int], list[str]]:
    """Sort ``(character, member)`` pairs; return characters, counts, members in row order."""
    files.sort()
    characters: list[str] = []
    counts: list[int] = []
    for character, _ in files:
        if not characters or characters[-1] != character:
            characters.append(character)
            counts.append(0)
        counts[-1] += 1
    return characters, counts, [member for _, member in files]


def _load_archive(root: Path, name: str, image_size: int, cache: bool) -> _Archive:
    zip_path, tree = root / f"{name}.zip", root / name
    if zip_path.is_file():
        try:
            zf = zipfile.ZipFile(zip_path)
        except zipfile.BadZipFile as exc:
            raise DataError(
                f"{zip_path} is not a zip archive ({exc}: a damaged download?); delete it and {_how_to_get(root)}"
            ) from None
        except OSError as exc:  # the archive may be fine: it cannot be read (permissions, a folder, a disk fault)
            raise DataError(
                f"cannot read {zip_path} ({exc.strerror or exc}); check its permissions (chmod a+r) and the disk"
            ) from None
        with zf:
            files = []
            for member in zf.namelist():
                parts = member.split("/")
                if len(parts) == 4 and parts[0] == name and parts[3].lower().endswith(".png"):
                    files.append((f"{parts[1]}/{parts[2]}", member))
            source, signature = zip_path, file_signature(zip_path)
            characters, counts, members = _group(files)

            def read(member: str) -> bytes:
                try:
                    return zf.read(member)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                    raise DataError(
                        f"{zip_path} is corrupt ({member}: {exc}); delete it and {_how_to_get(root)}"
                    ) from None

            return _decode_archive(name, source, signature, characters, counts, members, read, image_size, cache)
    if tree.is_dir():
        files = [
            (f"{p.parent.parent.name}/{p.parent.name}", str(p.relative_to(tree)))
            for p in tree.glob("*/*/*")
            if p.suffix.lower() == ".png" and p.is_file()
        ]
        characters, counts, members = _group(files)
        digest = hashlib.sha256()
        for member in members:
            st = (tree / member).stat()
            digest.update(f"{member}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        signature = [name, len(members), digest.hexdigest()]
        return _decode_archive(
            name, tree, signature, characters, counts, members, lambda m: tree / m, image_size, cache
        )
    raise DataError(f"Omniglot data not found: neither {zip_path} nor {tree}/ exists; {_how_to_get(root)}")


def _decode_archive(name, source, signature, characters, counts, members, read, image_size, cache) -> _Archive:
    if not members:
        raise DataError(
            f"{source} holds no Omniglot images (expected {name}/<Alphabet>/characterNN/*.png); "
            f"download the official archive again"
        )

    def build() -> tuple[Tensor, dict]:
        log.info("decoding %d Omniglot images from %s (once; later loads use the cache)", len(members), source)
        out = np.empty((len(members), 1, image_size, image_size), dtype=np.uint8)
        for i, member in enumerate(members):
            out[i, 0] = _decode(read(member), image_size, f"{member} in {source}")
        return torch.from_numpy(out), {"characters": characters, "counts": counts}

    key = cache_key("omniglot", name, signature, image_size)
    images, meta = cached_images(f"omniglot-{name}-{image_size}px", key, build, enabled=cache)
    return _Archive(images, list(meta["characters"]), [int(c) for c in meta["counts"]])


def _read_split(root: Path, split: str) -> tuple[list[str], str]:
    """Lines of the Vinyals split file and where they came from (the root's copy, else the packaged one)."""
    path = root / "splits" / "vinyals" / f"{split}.txt"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8").splitlines(), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(
                f"cannot read the split file {path} ({exc}); fix or delete it to use metareg's copy"
            ) from None
    try:
        packaged = resources.files("metareg.data").joinpath(f"splits/vinyals/{split}.txt.gz").read_bytes()
        lines = gzip.decompress(packaged).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path} is absent and metareg's packaged copy of the Vinyals split is unreadable ({exc}); "
            f"put the split files in {path.parent} or reinstall metareg"
        ) from None
    return lines, f"metareg's vinyals/{split}.txt"


def load_omniglot(
    root: str | Path,
    split: str,
    image_size: int = 28,
    class_split: str = "vinyals",
    *,
    cache: bool = True,
) -> ClassImages:
    """Load one split of Omniglot (see the module docstring for layouts and splits).

    Args:
        root: folder with ``images_background.zip`` and ``images_evaluation.zip`` (or extracted).
        split: ``train``/``val``/``trainval``/``test`` (vinyals) or ``train``/``test`` (alphabets;
            also ``background``/``evaluation``).
        image_size: side of the square images in pixels (28 as in MAML).
        class_split: ``"vinyals"`` or ``"alphabets"``.
        cache: read and write the decoded-image cache (``False`` decodes every time).

    Returns:
        A :class:`ClassImages` of ``[M, 1, image_size, image_size]`` ``uint8`` images, ink bright.
    """
    root = Path(root).expanduser()
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"Omniglot image_size must be a positive integer, got {image_size!r}")
    archives: tuple[str, ...]
    if class_split == "vinyals":
        if split not in VINYALS_SPLITS:
            raise DataError(
                f"unknown Omniglot split {split!r} for class_split='vinyals'; use one of {', '.join(VINYALS_SPLITS)}"
            )
        archives = OMNIGLOT_ARCHIVES
    elif class_split == "alphabets":
        if split not in ALPHABET_SPLITS:
            raise DataError(
                f"unknown Omniglot split {split!r} for class_split='alphabets'; use one of {', '.join(ALPHABET_SPLITS)}"
            )
        archives = (ALPHABET_SPLITS[split],)
    else:
        raise DataError(f"unknown Omniglot class_split {class_split!r}; use 'vinyals' or 'alphabets'")
    check_root(root, "Omniglot", _how_to_get(root))

    loaded = [_load_archive(root, name, image_size, cache) for name in archives]
    images = torch.cat([a.images for a in loaded]) if len(loaded) > 1 else loaded[0].images
    rows: dict[str, tuple[int, int]] = {}  # character -> (first row, count) in `images`
    start = 0
    for archive in loaded:
        for character, count in zip(archive.characters, archive.counts):
            rows[character] = (start, count)
            start += count

    if class_split == "vinyals":
        lines, origin = _read_split(root, split)
        wanted: list[tuple[str, int]] = []
        seen: set[str] = set()
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            match = _SPLIT_LINE.match(line)
            if match is None:
                raise DataError(f"{origin} line {number}: {line!r} is not <Alphabet>/characterNN/rotDDD; fix the file")
            if match.group(1) not in rows:
                raise DataError(
                    f"{origin} line {number}: character {match.group(1)} is in neither archive under "
                    f"{root}; use the official Omniglot archives or fix the split file"
                )
            if line in seen:
                raise DataError(f"{origin} line {number}: class {line} is listed twice; fix the file")
            seen.add(line)
            wanted.append((match.group(1), ROTATIONS[match.group(2)]))
        if not wanted:
            raise DataError(f"{origin} lists no classes; fix the file or delete it to use metareg's copy")
    else:
        wanted = [(character, k) for character in loaded[0].characters for k in range(4)]

    # Keep only the split's characters, each once, and point every (character, rotation) class at them.
    kept: dict[str, Tensor] = {}
    selected: list[Tensor] = []
    offset = 0
    for character, _ in wanted:
        if character not in kept:
            first, count = rows[character]
            selected.append(torch.arange(first, first + count))
            kept[character] = torch.arange(offset, offset + count)
            offset += count
    split_images = images[torch.cat(selected)]
    names = [f"{character}/rot{90 * k:03d}" for character, k in wanted]
    return ClassImages(
        images=split_images,
        class_indices=[kept[character] for character, _ in wanted],
        class_names=names,
        rotations=torch.tensor([k for _, k in wanted], dtype=torch.long),
        dataset="omniglot",
        split=split if class_split == "vinyals" else f"{split} ({class_split})",
    )


register_episodic(
    EpisodicDataset(
        "omniglot",
        load_omniglot,
        channels=1,
        image_size=28,
        needs_root=True,
        handled=("root", "split", "image_size"),
        description="Omniglot, Vinyals split by default",
    )
)
