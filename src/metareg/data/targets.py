"""The image-classification data sets MetaPerturb transfers to, each read in the layout its
distribution unpacks to, registered for :func:`~metareg.data.labeled.load_labeled`.

``root`` may be the data set's own folder (the name given first below) or the folder containing
it. Every loader returns square ``uint8`` ``[N, C, image_size, image_size]`` images; the ones that
read image files return RGB and keep the decoded split in the data cache
(:mod:`metareg.data.cache`, keyed by every file's name, size and modification time); the array
formats load fast and are only resized (PIL LANCZOS) when their size differs from ``image_size``.

``tinyimagenet`` (splits ``train``, ``val``)::

    tiny-imagenet-200/wnids.txt                    class ids, one a line (the class order)
    tiny-imagenet-200/words.txt                    optional: wnid<TAB>name, other names; the first is used
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG  +  val/val_annotations.txt   file<TAB>wnid<TAB>box

``cifar100`` (``train``, ``test``; option ``labels="fine"|"coarse"``), the *binary* version::

    cifar-100-binary/train.bin, test.bin           3074-byte records: coarse, fine, 1024 R, 1024 G, 1024 B
    cifar-100-binary/fine_label_names.txt, coarse_label_names.txt

``stl10`` (``train``, ``test``)::

    stl10_binary/{train,test}_X.bin                uint8 3x96x96 images, each channel column-major
    stl10_binary/{train,test}_y.bin                uint8 labels 1..10
    stl10_binary/class_names.txt

``svhn`` (``train``, ``test``, ``extra``), cropped digits, MATLAB v5 (needs scipy)::

    {train,test,extra}_32x32.mat                   X uint8 [32, 32, 3, N], y [N, 1] (10 is the digit 0)

``stanford-dogs`` (``train``, ``test``; needs scipy)::

    Images/<wnid>-<breed>/*.jpg                    classes: the sorted folders (labels are 1-based indices)
    train_list.mat, test_list.mat                  at the top or in lists/: file_list, labels

``stanford-cars`` (``train``, ``test``; option ``crop_to_box=False``; needs scipy)::

    cars_train/*.jpg, cars_test/*.jpg
    devkit/cars_train_annos.mat, devkit/cars_meta.mat                 annotations (bbox_x1.., class, fname), class_names
    cars_test_annos_withlabels.mat                 at the top or in devkit/

``aircraft`` (``train``, ``val``, ``trainval``, ``test``; options ``annotation="variant"|"family"|
"manufacturer"``, ``crop_banner=True`` removes the 20-row copyright banner at the bottom)::

    fgvc-aircraft-2013b/data/images/<id>.jpg
    fgvc-aircraft-2013b/data/images_<annotation>_<split>.txt    "<id> <label, may hold spaces>"
    fgvc-aircraft-2013b/data/variants.txt (families.txt, manufacturers.txt)   optional class order, else sorted

``cub`` (``train``, ``test``)::

    CUB_200_2011/images/<class folder>/*.jpg
    CUB_200_2011/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt   "<id> <value>"

``imagefolder`` (splits: the subfolders of ``root``)::

    root/<split>/<class name>/*.{jpg,jpeg,png,bmp,gif,webp}       classes: the sorted subfolders

``npz`` (splits: the ``.npz`` files in ``root``)::

    root/<split>.npz   x uint8 [N, H, W], [N, H, W, C] or [N, C, H, W] (C 1 or 3); y int [N] (0-based);
                       optional class_names (string array). Read without unpickling; channels kept.

Every problem a user can cause is a one-line :class:`~metareg.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from .cache import cache_key, cached_images
from .images import decode_image, too_large
from .labeled import LabeledImages, register_labeled
from .roots import check_root

__all__ = ["IMAGE_EXTENSIONS", "TARGET_DATASETS"]

log = logging.getLogger(__name__)

#: Extensions (lower case) that ``imagefolder`` reads.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
#: The names this module registers.
TARGET_DATASETS = (
    "tinyimagenet",
    "cifar100",
    "stl10",
    "svhn",
    "stanford-dogs",
    "stanford-cars",
    "aircraft",
    "cub",
    "imagefolder",
    "npz",
)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class _Layout(NamedTuple):
    """What a data set looks like on disk, for finding its folder and for error messages."""

    name: str  # registered name: LabeledImages.dataset and the cache file stem
    title: str  # the name in messages
    folders: tuple[str, ...]  # folder names it unpacks to; root may be their parent
    markers: tuple[str, ...]  # paths that only the data set's own folder holds
    layout: str  # the expected layout, for messages


class _Item(NamedTuple):
    """One image file to decode, its 0-based label and an optional crop box (PIL's left, top, right, bottom)."""

    path: Path
    label: int
    box: tuple[int, int, int, int] | None = None


# ------------------------------------------------------------------------------------ checks
def _one_line(exc: BaseException, path: Path | None = None) -> str:
    """``exc``'s message on one line (without ``path``, which the caller's message names)."""
    text = str(exc)
    if path is not None:
        text = text.replace(f" '{path}'", "").replace(f" {path}", "")
    return " ".join(text.split()) or type(exc).__name__


def _check_split(spec: _Layout, split: str, valid: Sequence[str], note: str = "") -> None:
    if split not in valid:
        raise DataError(f"unknown {spec.title} split {split!r}; use one of {', '.join(valid)}{note}")


def _check_choice(spec: _Layout, option: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise DataError(
            f"{spec.title} option {option}={value!r} is not valid; use one of {', '.join(map(repr, valid))}"
        )


def _check_flag(spec: _Layout, option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise DataError(f"{spec.title} option {option} must be true or false, got {value!r}")


def _check_labels(spec: _Layout, labels: np.ndarray, count: int, source: Path, first: int = 0) -> None:
    """``labels`` (already shifted to 0-based) must lie in ``0..count-1``; ``first`` is the file's own base."""
    bad = labels[(labels < 0) | (labels >= count)]
    if bad.size:
        raise DataError(
            f"{spec.title} labels in {source} must lie in {first}..{count - 1 + first} "
            f"({count} classes); found {int(bad[0]) + first}"
        )


# ------------------------------------------------------------------------------------- files
def _locate(root: Path, spec: _Layout) -> Path:
    """The data set's folder: ``root`` or ``root/<one of spec.folders>``, whichever holds a marker."""
    root = Path(root).expanduser()
    expected = f"expected {spec.layout}, or the folder containing {spec.folders[0]}/"
    check_root(root, spec.title, expected)
    for candidate in (root, *(root / f for f in spec.folders)):
        if any((candidate / m).exists() for m in spec.markers):
            return candidate
    raise DataError(f"{spec.title} root {root} does not hold the data set; {expected}")


def _require(path: Path, spec: _Layout, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{spec.title} {what} {path} is missing; expected {spec.layout}")
    return path


def _find(base: Path, name: str, subdirs: Sequence[str], spec: _Layout, what: str) -> Path:
    """``base/name`` or ``base/<subdir>/name``, the first that exists."""
    places = [base, *(base / d for d in subdirs)]
    for place in places:
        if (place / name).is_file():
            return place / name
    raise DataError(f"{spec.title} {what} {name} is missing; looked in {', '.join(str(p) for p in places)}")


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (extension in :data:`IMAGE_EXTENSIONS`, any case), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_text(path: Path, spec: _Layout) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {spec.title} file {path} ({_one_line(exc)}); restore it") from None


def _read_lines(path: Path, spec: _Layout) -> list[str]:
    """The non-empty lines of a one-name-per-line file, stripped."""
    lines = [line.strip() for line in _read_text(path, spec) if line.strip()]
    if not lines:
        raise DataError(f"{spec.title} file {path} is empty; restore it")
    return lines


def _read_pairs(path: Path, spec: _Layout) -> list[tuple[int, str, str]]:
    """``(line number, id, value)`` for each non-empty line ``<id> <value>`` (the value may hold spaces)."""
    out = []
    for number, line in enumerate(_read_text(path, spec), 1):
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path} line {number}: expected '<id> <value>', got {line.strip()!r}; fix the file")
        out.append((number, parts[0], parts[1].strip()))
    if not out:
        raise DataError(f"{spec.title} file {path} is empty; restore it")
    return out


def _read_map(path: Path, spec: _Layout) -> dict[str, str]:
    """An ``<id> <value>`` file as a dict; an id listed twice is an error."""
    out: dict[str, str] = {}
    for number, key, value in _read_pairs(path, spec):
        if key in out:
            raise DataError(f"{path} line {number}: id {key} is listed twice; fix the file")
        out[key] = value
    return out


def _read_bytes(path: Path, spec: _Layout, record: int) -> np.ndarray:
    """A binary file as ``uint8`` rows of ``record`` bytes."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {spec.title} file {path} ({_one_line(exc)}); restore it") from None
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{spec.title} file {path} has {raw.size} bytes, not a whole number of {record}-byte "
            "records; it is truncated or not the expected file: replace it"
        )
    return raw.reshape(-1, record)


# ------------------------------------------------------------------------------- MATLAB files
def _read_mat(path: Path, spec: _Layout, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The variables ``names`` of a MATLAB v5 file (never unpickles; needs scipy)."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"reading {spec.title}'s MATLAB files needs scipy: pip install scipy") from None
    try:
        content = scipy.io.loadmat(str(path), variable_names=list(names))
    except Exception as exc:  # scipy raises many types on a damaged or foreign file
        raise DataError(
            f"cannot read {spec.title} MATLAB file {path} ({_one_line(exc)}); it is corrupt "
            "or not a MATLAB v5 file: replace it"
        ) from None
    missing = [n for n in names if n not in content]
    if missing:
        raise DataError(
            f"{spec.title} MATLAB file {path} has no variable {', '.join(missing)}; expected {', '.join(names)}"
        )
    return {n: content[n] for n in names}


def _mat_value(value: Any, path: Path, what: str) -> Any:
    """A MATLAB cell or struct entry (1-element arrays, maybe nested) as a Python str or number."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise DataError(
                f"{path}: a {what} entry holds {value.size} values, expected one; "
                "the file is not the expected annotation file"
            )
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _mat_strings(array: np.ndarray, path: Path, what: str) -> list[str]:
    values = [_mat_value(v, path, what) for v in np.asarray(array).reshape(-1)]
    if not all(isinstance(v, str) for v in values):
        raise DataError(f"{path}: {what} must hold text, one entry per image or class")
    return values


def _mat_ints(values: Sequence[Any] | np.ndarray, path: Path, what: str) -> list[int]:
    out = []
    for v in np.asarray(values).reshape(-1) if isinstance(values, np.ndarray) else values:
        v = _mat_value(v, path, what)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise DataError(f"{path}: {what} must hold whole numbers, found {v!r}")
        out.append(int(v))
    return out


def _mat_struct(records: np.ndarray, path: Path, what: str, fields: Sequence[str]) -> dict[str, list[Any]]:
    """The ``fields`` of a MATLAB struct array, one list of entries per field."""
    have = records.dtype.names or ()
    missing = [f for f in fields if f not in have]
    if missing:
        raise DataError(
            f"{path}: {what} has no field {', '.join(missing)}; expected a struct array with {', '.join(fields)}"
        )
    flat = records.reshape(-1)
    return {f: [_mat_value(v, path, f"{what}.{f}") for v in flat[f]] for f in fields}


def _int_labels(y: Any, path: Path, spec: _Layout, count: int) -> np.ndarray:
    """Labels ``y`` as ``int64`` ``[count]``: whole numbers in any numeric dtype, one per image."""
    y = np.asarray(y)
    if y.dtype.kind not in "iuf" or y.size != count or (y.ndim > 1 and max(y.shape) != y.size):
        raise DataError(
            f"{spec.title} labels in {path} must be {count} whole numbers (one per image), "
            f"got {y.dtype} array of shape {list(y.shape)}"
        )
    y = y.reshape(-1)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise DataError(f"{spec.title} labels in {path} must be whole numbers")
    return y.astype(np.int64)


# ------------------------------------------------------------------------------------ images
def _decode_rgb(
    path: Path, image_size: int, box: tuple[int, int, int, int] | None, trim_bottom: int, spec: _Layout
) -> np.ndarray:
    """One image file as ``uint8`` ``[3, S, S]``, first cropped to ``box`` and cut ``trim_bottom`` rows."""
    try:
        if box is None and not trim_bottom:
            return decode_image(path, "RGB", image_size).transpose(2, 0, 1)
        with Image.open(path) as file:
            im = file.convert("RGB")
        if box is not None:
            w, h = im.size
            left, top, right, bottom = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
            if right <= left or bottom <= top:
                raise DataError(
                    f"{spec.title} bounding box {list(box)} lies outside image {path} ({w}x{h}); fix its annotation"
                )
            im = im.crop((left, top, right, bottom))
        if trim_bottom:
            w, h = im.size
            if h <= trim_bottom:
                raise DataError(
                    f"{spec.title} image {path} is {h} pixels high; cannot remove its "
                    f"{trim_bottom}-row banner (pass crop_banner=False)"
                )
            im = im.crop((0, 0, w, h - trim_bottom))
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise too_large(path, exc) from None
        raise DataError(
            f"cannot decode {spec.title} image {path} ({_one_line(exc, path)}); the file is corrupt: replace it"
        ) from None


def _decode_items(
    spec: _Layout,
    split: str,
    image_size: int,
    base: Path,
    items: Sequence[_Item],
    class_names: Sequence[str],
    *,
    trim_bottom: int = 0,
    variant: Sequence[str] = (),
    cache: bool = True,
) -> LabeledImages:
    """Decode ``items`` (once; then from the data cache) into a :class:`LabeledImages`."""
    _check_flag(spec, "cache", cache)
    if not items:
        raise DataError(f"{spec.title} {split} split lists no images; check {base} ({spec.layout})")
    digest = hashlib.sha256()
    for item in items:
        try:
            st = item.path.stat()
        except OSError:
            raise DataError(
                f"{spec.title} image {item.path} is missing; restore it (the {split} split lists it)"
            ) from None
        try:
            where = item.path.relative_to(base).as_posix()
        except ValueError:
            where = str(item.path)
        digest.update(f"{where}\0{st.st_size}\0{st.st_mtime_ns}\0{item.label}\0{item.box}\n".encode())

    def build() -> tuple[Tensor, dict[str, Any]]:
        log.info("decoding %d %s %s images (once; later loads use the cache)", len(items), spec.title, split)
        out = np.empty((len(items), 3, image_size, image_size), dtype=np.uint8)
        for i, item in enumerate(items):
            out[i] = _decode_rgb(item.path, image_size, item.box, trim_bottom, spec)
        return torch.from_numpy(out), {"labels": [item.label for item in items], "class_names": list(class_names)}

    key = cache_key(spec.name, split, image_size, trim_bottom, list(variant), list(class_names), digest.hexdigest())
    stem = "-".join([spec.name, *variant, split, f"{image_size}px"])
    images, meta = cached_images(stem, key, build, enabled=cache)
    return LabeledImages(images, torch.tensor(meta["labels"], dtype=torch.long), meta["class_names"], spec.name, split)


def _resize_array(x: np.ndarray, image_size: int) -> np.ndarray:
    """``uint8`` ``[N, C, H, W]`` (C 1 or 3) at ``image_size`` x ``image_size``, each image resized with LANCZOS."""
    n, c, h, w = x.shape
    if (h, w) == (image_size, image_size):
        return x
    out = np.empty((n, c, image_size, image_size), dtype=np.uint8)
    for i in range(n):
        im = Image.fromarray(np.ascontiguousarray(x[i, 0] if c == 1 else x[i].transpose(1, 2, 0)))
        pixels = np.asarray(im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS))
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return out


def _from_arrays(
    spec: _Layout, split: str, x: np.ndarray, y: np.ndarray, class_names: Sequence[str], image_size: int
) -> LabeledImages:
    images = torch.from_numpy(np.ascontiguousarray(_resize_array(x, image_size)))
    return LabeledImages(images, torch.from_numpy(y.astype(np.int64)), class_names, spec.name, split)


# ---------------------------------------------------------------------------------- loaders
_TINY = _Layout(
    "tinyimagenet",
    "Tiny ImageNet",
    ("tiny-imagenet-200",),
    ("wnids.txt",),
    "tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG and val/images/*.JPEG plus val/val_annotations.txt",
)


@register_labeled("tinyimagenet")
def load_tinyimagenet(root: Path, split: str, image_size: int, cache: bool = True) -> LabeledImages:
    """Tiny ImageNet (200 classes of 64x64 images); classes in ``wnids.txt`` order."""
    _check_split(_TINY, split, ("train", "val"), " (the test images carry no labels)")
    base = _locate(root, _TINY)
    wnids = _read_lines(_require(base / "wnids.txt", _TINY, "class list"), _TINY)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    if len(index) != len(wnids):
        raise DataError(f"{base / 'wnids.txt'} lists a class twice; restore the file")
    names = list(wnids)
    if (base / "words.txt").is_file():
        for line in _read_text(base / "words.txt", _TINY):
            wnid, _, words = line.strip().partition("\t")
            if wnid in index and words.split(",")[0].strip():
                names[index[wnid]] = words.split(",")[0].strip()
    items: list[_Item] = []
    if split == "train":
        for wnid in wnids:
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise DataError(f"Tiny ImageNet class folder {folder} is missing; expected {_TINY.layout}")
            items += [_Item(path, index[wnid]) for path in _image_files(folder)]
    else:
        annotations = _require(base / "val" / "val_annotations.txt", _TINY, "val annotation file")
        for number, filename, rest in _read_pairs(annotations, _TINY):
            wnid = rest.split()[0]
            if wnid not in index:
                raise DataError(f"{annotations} line {number}: class {wnid} is not in wnids.txt; fix the file")
            items.append(_Item(base / "val" / "images" / filename, index[wnid]))
    return _decode_items(_TINY, split, image_size, base, items, names, cache=cache)


_CIFAR = _Layout(
    "cifar100",
    "CIFAR-100",
    ("cifar-100-binary",),
    ("train.bin", "test.bin"),
    "cifar-100-binary/ with train.bin, test.bin, fine_label_names.txt and coarse_label_names.txt (the binary version)",
)


@register_labeled("cifar100")
def load_cifar100(root: Path, split: str, image_size: int, labels: str = "fine") -> LabeledImages:
    """CIFAR-100, binary version: 100 fine or 20 coarse classes of 32x32 images."""
    _check_split(_CIFAR, split, ("train", "test"))
    _check_choice(_CIFAR, "labels", labels, ("fine", "coarse"))
    root = Path(root).expanduser()
    pickled = [p for p in (root, root / "cifar-100-python") if (p / "meta").is_file() and (p / "train").is_file()]
    if pickled and not any((p / "train.bin").is_file() for p in (root, root / "cifar-100-binary")):
        raise DataError(
            f"{pickled[0]} holds the pickled Python version of CIFAR-100, which metareg does not read "
            "(unpickling can run code); download the binary version (cifar-100-binary.tar.gz)"
        )
    base = _locate(root, _CIFAR)
    data_path = _require(base / f"{split}.bin", _CIFAR, f"{split} split file")
    names_path = _require(base / f"{labels}_label_names.txt", _CIFAR, "class name file")
    names = _read_lines(names_path, _CIFAR)
    records = _read_bytes(data_path, _CIFAR, 2 + 3 * 32 * 32)
    y = records[:, 1 if labels == "fine" else 0].astype(np.int64)
    _check_labels(_CIFAR, y, len(names), data_path)
    return _from_arrays(_CIFAR, split, records[:, 2:].reshape(-1, 3, 32, 32), y, names, image_size)


_STL = _Layout(
    "stl10",
    "STL-10",
    ("stl10_binary",),
    ("train_X.bin", "test_X.bin"),
    "stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, test_y.bin and class_names.txt",
)


@register_labeled("stl10")
def load_stl10(root: Path, split: str, image_size: int) -> LabeledImages:
    """STL-10's labeled splits (10 classes of 96x96 images; the unlabeled split is not read)."""
    _check_split(_STL, split, ("train", "test"))
    base = _locate(root, _STL)
    x_path = _require(base / f"{split}_X.bin", _STL, f"{split} image file")
    y_path = _require(base / f"{split}_y.bin", _STL, f"{split} label file")
    names = _read_lines(_require(base / "class_names.txt", _STL, "class name file"), _STL)
    # Each channel is stored column by column: swap the last two axes to get rows.
    x = _read_bytes(x_path, _STL, 3 * 96 * 96).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    y = _read_bytes(y_path, _STL, 1).reshape(-1).astype(np.int64) - 1
    if y.size != x.shape[0]:
        raise DataError(
            f"STL-10 {split} split: {y_path} holds {y.size} labels for the {x.shape[0]} images "
            f"of {x_path}; replace the files"
        )
    _check_labels(_STL, y, len(names), y_path, first=1)
    return _from_arrays(_STL, split, x, y, names, image_size)


_SVHN = _Layout(
    "svhn",
    "SVHN",
    ("svhn", "SVHN"),
    ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
    "train_32x32.mat, test_32x32.mat and optionally extra_32x32.mat (SVHN cropped digits)",
)


@register_labeled("svhn")
def load_svhn(root: Path, split: str, image_size: int) -> LabeledImages:
    """SVHN cropped digits, classes "0".."9" (the files' label 10 is the digit 0)."""
    _check_split(_SVHN, split, ("train", "test", "extra"))
    base = _locate(root, _SVHN)
    path = _require(base / f"{split}_32x32.mat", _SVHN, f"{split} split file")
    mat = _read_mat(path, _SVHN, ("X", "y"))
    x = mat["X"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"SVHN file {path}: X must be uint8 [H, W, 3, N], got {x.dtype} {list(x.shape)}")
    y = _int_labels(mat["y"], path, _SVHN, x.shape[3])
    _check_labels(_SVHN, y, 11, path)
    y[y == 10] = 0
    return _from_arrays(_SVHN, split, x.transpose(3, 2, 0, 1), y, [str(d) for d in range(10)], image_size)


_DOGS = _Layout(
    "stanford-dogs",
    "Stanford Dogs",
    ("stanford-dogs", "stanford_dogs", "StanfordDogs", "dogs"),
    ("Images",),
    "Images/<wnid>-<breed>/*.jpg plus train_list.mat and test_list.mat (at the top or in lists/)",
)


@register_labeled("stanford-dogs")
def load_stanford_dogs(root: Path, split: str, image_size: int, cache: bool = True) -> LabeledImages:
    """Stanford Dogs (120 breeds); class k is the k-th sorted folder of ``Images/``, named by its breed."""
    _check_split(_DOGS, split, ("train", "test"))
    base = _locate(root, _DOGS)
    image_dir = base / "Images"
    list_path = _find(base, f"{split}_list.mat", ("lists",), _DOGS, f"{split} split file")
    mat = _read_mat(list_path, _DOGS, ("file_list", "labels"))
    files = _mat_strings(mat["file_list"], list_path, "file_list")
    labels = _mat_ints(mat["labels"], list_path, "labels")
    if len(files) != len(labels):
        raise DataError(f"{list_path}: {len(files)} files but {len(labels)} labels; replace the file")
    folders = _subfolders(image_dir) if image_dir.is_dir() else []
    if not folders:
        raise DataError(f"Stanford Dogs image folder {image_dir} holds no class folders; expected {_DOGS.layout}")
    items = []
    for number, (rel, label) in enumerate(zip(files, labels), 1):
        rel = rel.replace("\\", "/")
        if not 1 <= label <= len(folders):
            raise DataError(
                f"{list_path}: entry {number} ({rel}) has label {label}, but {image_dir} holds "
                f"{len(folders)} class folders (labels 1..{len(folders)})"
            )
        if rel.split("/")[0] != folders[label - 1]:
            raise DataError(
                f"{list_path}: entry {number} ({rel}) has label {label}, which is class folder "
                f"{folders[label - 1]}; the list does not match {image_dir}"
            )
        items.append(_Item(image_dir / rel, label - 1))
    names = [folder.split("-", 1)[1] if "-" in folder else folder for folder in folders]
    return _decode_items(_DOGS, split, image_size, base, items, names, cache=cache)


_CARS = _Layout(
    "stanford-cars",
    "Stanford Cars",
    ("stanford-cars", "stanford_cars", "StanfordCars", "cars"),
    ("cars_train", "cars_test", "devkit"),
    "cars_train/, cars_test/, devkit/cars_train_annos.mat, devkit/cars_meta.mat and "
    "cars_test_annos_withlabels.mat (at the top or in devkit/)",
)
_BOX = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@register_labeled("stanford-cars")
def load_stanford_cars(
    root: Path, split: str, image_size: int, crop_to_box: bool = False, cache: bool = True
) -> LabeledImages:
    """Stanford Cars (196 models); ``crop_to_box`` crops each image to its bounding box first."""
    _check_split(_CARS, split, ("train", "test"))
    _check_flag(_CARS, "crop_to_box", crop_to_box)
    base = _locate(root, _CARS)
    ann_name = "cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
    ann_path = _find(base, ann_name, ("devkit",), _CARS, f"{split} annotation file")
    meta_path = _find(base, "cars_meta.mat", ("devkit",), _CARS, "class name file")
    names = _mat_strings(_read_mat(meta_path, _CARS, ("class_names",))["class_names"], meta_path, "class_names")
    records = _read_mat(ann_path, _CARS, ("annotations",))["annotations"]
    fields = _mat_struct(records, ann_path, "annotations", (*_BOX, "class", "fname"))
    labels = _mat_ints(fields["class"], ann_path, "annotations.class")
    boxes = list(zip(*(_mat_ints(fields[f], ann_path, f"annotations.{f}") for f in _BOX)))
    files = _mat_strings(np.array(fields["fname"], dtype=object), ann_path, "annotations.fname")
    image_dir = base / f"cars_{split}"
    if not image_dir.is_dir():
        raise DataError(f"Stanford Cars image folder {image_dir} is missing; expected {_CARS.layout}")
    _check_labels(_CARS, np.array(labels) - 1, len(names), ann_path, first=1)
    # The devkit's boxes are inclusive pixel coordinates; PIL's right and bottom edges are exclusive.
    items = [
        _Item(image_dir / name, label - 1, (x1, y1, x2 + 1, y2 + 1) if crop_to_box else None)
        for name, label, (x1, y1, x2, y2) in zip(files, labels, boxes)
    ]
    return _decode_items(
        _CARS, split, image_size, base, items, names, variant=("box",) if crop_to_box else (), cache=cache
    )


_AIRCRAFT = _Layout(
    "aircraft",
    "FGVC-Aircraft",
    ("fgvc-aircraft-2013b",),
    ("data/images",),
    "fgvc-aircraft-2013b/data/ with images/<id>.jpg and images_<annotation>_<split>.txt",
)
_AIRCRAFT_SPLITS = ("train", "val", "trainval", "test")
_AIRCRAFT_NAMES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
_BANNER_ROWS = 20


@register_labeled("aircraft")
def load_aircraft(
    root: Path, split: str, image_size: int, annotation: str = "variant", crop_banner: bool = True, cache: bool = True
) -> LabeledImages:
    """FGVC-Aircraft at one ``annotation`` level (variant: 100 classes, family: 70, manufacturer: 30)."""
    _check_split(_AIRCRAFT, split, _AIRCRAFT_SPLITS)
    _check_choice(_AIRCRAFT, "annotation", annotation, tuple(_AIRCRAFT_NAMES))
    _check_flag(_AIRCRAFT, "crop_banner", crop_banner)
    data = _locate(root, _AIRCRAFT) / "data"
    list_path = _require(data / f"images_{annotation}_{split}.txt", _AIRCRAFT, f"{split} split file")
    rows = _read_pairs(list_path, _AIRCRAFT)
    names_path = data / _AIRCRAFT_NAMES[annotation]
    if names_path.is_file():
        names = _read_lines(names_path, _AIRCRAFT)
    else:  # every split's labels, so that all splits number the classes alike
        lists = [data / f"images_{annotation}_{s}.txt" for s in _AIRCRAFT_SPLITS]
        names = sorted({label for p in lists if p.is_file() for _, _, label in _read_pairs(p, _AIRCRAFT)})
    index = {name: i for i, name in enumerate(names)}
    items = []
    for number, image_id, label in rows:
        if label not in index:
            raise DataError(
                f"{list_path} line {number}: {annotation} {label!r} is not listed in {names_path}; fix the files"
            )
        items.append(_Item(data / "images" / f"{image_id}.jpg", index[label]))
    return _decode_items(
        _AIRCRAFT,
        split,
        image_size,
        data.parent,
        items,
        names,
        trim_bottom=_BANNER_ROWS if crop_banner else 0,
        variant=(annotation,),
        cache=cache,
    )


_CUB = _Layout(
    "cub",
    "CUB-200-2011",
    ("CUB_200_2011",),
    ("images.txt",),
    "CUB_200_2011/ with images/<class>/*.jpg, images.txt, image_class_labels.txt, train_test_split.txt and classes.txt",
)


@register_labeled("cub")
def load_cub(root: Path, split: str, image_size: int, cache: bool = True) -> LabeledImages:
    """CUB-200-2011 birds (200 classes) with the official train/test split; names without the "001." prefix."""
    _check_split(_CUB, split, ("train", "test"))
    base = _locate(root, _CUB)
    paths = _read_map(_require(base / "images.txt", _CUB, "image list"), _CUB)
    label_path = _require(base / "image_class_labels.txt", _CUB, "label file")
    split_path = _require(base / "train_test_split.txt", _CUB, "split file")
    class_path = _require(base / "classes.txt", _CUB, "class list")
    labels, is_train, classes = _read_map(label_path, _CUB), _read_map(split_path, _CUB), _read_map(class_path, _CUB)
    index = {class_id: i for i, class_id in enumerate(classes)}
    names = [re.sub(r"^\d+\.", "", name) for name in classes.values()]
    items = []
    for image_id, rel in paths.items():
        flag, class_id = is_train.get(image_id), labels.get(image_id)
        if flag not in ("0", "1"):
            raise DataError(
                f"{split_path}: image {image_id} of images.txt needs a line '{image_id} 1' (train) "
                f"or '{image_id} 0' (test); found {flag!r}"
            )
        if class_id not in index:
            raise DataError(
                f"{label_path}: image {image_id} of images.txt needs a class id listed in "
                f"classes.txt; found {class_id!r}"
            )
        if flag == ("1" if split == "train" else "0"):
            items.append(_Item(base / "images" / rel, index[class_id]))
    return _decode_items(_CUB, split, image_size, base, items, names, cache=cache)


_FOLDER = _Layout("imagefolder", "imagefolder", ("",), (), "root/<split>/<class name>/<images>")


@register_labeled("imagefolder")
def load_imagefolder(root: Path, split: str, image_size: int, cache: bool = True) -> LabeledImages:
    """``root/<split>/<class>/*.jpg|png|...``; classes are the split's sorted subfolders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder root {root} does not exist; expected {_FOLDER.layout}")
    splits = _subfolders(root)
    if not splits:
        raise DataError(f"imagefolder root {root} has no split folders; expected {_FOLDER.layout}")
    _check_split(_FOLDER, split, splits)
    classes = _subfolders(root / split)
    if not classes:
        raise DataError(f"image folder {root / split} has no class folders; expected {_FOLDER.layout}")
    items = [_Item(path, label) for label, name in enumerate(classes) for path in _image_files(root / split / name)]
    if not items:
        raise DataError(
            f"image folder {root / split} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders"
        )
    return _decode_items(_FOLDER, split, image_size, root, items, classes, cache=cache)


_NPZ = _Layout("npz", "npz", ("",), (), "root/<split>.npz with arrays x, y and optionally class_names")


def _channels_first(x: np.ndarray, path: Path) -> np.ndarray:
    """``x`` as ``[N, C, H, W]`` from ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C 1 or 3)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if last and (not first or x.shape[1] == x.shape[2]):
            return x.transpose(0, 3, 1, 2)
        if first:
            return x
    raise DataError(
        f"{path}: x must be images [N, H, W], [N, H, W, C] or [N, C, H, W] with C 1 or 3; got shape {list(x.shape)}"
    )


@register_labeled("npz")
def load_npz(root: Path, split: str, image_size: int) -> LabeledImages:
    """``root/<split>.npz`` arrays; channels kept, images resized when their size differs."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"npz root {root} does not exist; expected {_NPZ.layout}")
    splits = sorted(p.stem for p in root.glob("*.npz") if p.is_file())
    if not splits:
        raise DataError(f"npz root {root} holds no .npz files; expected {_NPZ.layout}")
    _check_split(_NPZ, split, splits)
    path = root / f"{split}.npz"
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK":  # every .npz is a zip archive
            raise DataError(
                f"{path} is not an .npz archive (corrupt or another format); save the arrays with "
                "np.savez(path, x=..., y=...)"
            )
        with np.load(path, allow_pickle=False) as content:
            missing = [k for k in ("x", "y") if k not in content.files]
            if missing:
                held = ", ".join(content.files) or "none"
                raise DataError(f"{path} has no array {', '.join(missing)} (it holds {held}); expected {_NPZ.layout}")
            x, y = content["x"], content["y"]
            names = content["class_names"] if "class_names" in content.files else None
    except DataError:
        raise
    except Exception as exc:  # zipfile errors, refused object arrays, truncated arrays ...
        raise DataError(
            f"cannot read {path} ({_one_line(exc, path)}); it is corrupt or holds object arrays: save "
            "plain arrays (class names as a string array) with np.savez"
        ) from None
    if x.dtype != np.uint8:
        raise DataError(f"{path}: x must be uint8 (0..255), got {x.dtype}; convert it with x.astype(np.uint8)")
    x = _channels_first(x, path)
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: y must hold integer labels, got {y.dtype}")
    y = _int_labels(y, path, _NPZ, x.shape[0])
    if names is None:
        class_names = [str(k) for k in range(int(y.max()) + 1 if y.size else 0)]
    elif names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: class_names must be a 1-D string array, got {names.dtype} {list(names.shape)}")
    else:
        class_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    _check_labels(_NPZ, y, len(class_names), path)
    return _from_arrays(_NPZ, split, x, y, class_names, image_size)
