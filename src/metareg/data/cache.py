"""On-disk cache of decoded image data sets.

Decoding tens of thousands of PNG/JPEG files takes seconds to minutes; the loaders decode once
and keep the result as a ``.safetensors`` file (the ``uint8`` images) plus a ``.json`` file (class
names and the other metadata). Where the cache lives:

1. ``$METAREG_CACHE/data/`` when the environment variable ``METAREG_CACHE`` is set and non-empty;
2. ``~/.cache/metareg/data/`` otherwise.

Entries are named ``<stem>-<key>`` where ``key`` hashes what the decoded result depends on (the
source files' names, sizes and modification times, the image size, a format version), so a changed
source or option never reads a stale entry. Both files are written to a temporary name in the same
folder and moved into place with ``os.replace``, so a crash or a concurrent writer never leaves a
half-written entry. A cache that cannot be written (read-only home) only costs a warning; a cache
entry that cannot be read is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ..files import write_bytes_atomic

__all__ = ["cache_dir", "cache_key", "cached_images", "file_signature"]

#: Bump when the decoded layout changes, so old entries are ignored.
CACHE_FORMAT = 1


def cache_dir() -> Path:
    """The folder holding decoded data sets (``$METAREG_CACHE/data`` or ``~/.cache/metareg/data``)."""
    root = os.environ.get("METAREG_CACHE", "").strip()
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "metareg"
    return base / "data"


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_signature(path: Path) -> list[Any]:
    """``[name, size, mtime_ns]`` of a file: enough to notice that it was replaced or edited."""
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _load(tensor_path: Path, meta_path: Path) -> tuple[Tensor, dict[str, Any]] | None:
    if not (tensor_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        images = load_file(str(tensor_path))["images"]
    except Exception as exc:  # any unreadable entry is simply rebuilt
        warnings.warn(f"ignoring unreadable cache entry {tensor_path} ({exc}); decoding again", stacklevel=3)
        return None
    if (
        images.dtype != torch.uint8
        or not isinstance(meta, dict)
        or meta.get("format") != CACHE_FORMAT
        or not isinstance(meta.get("meta"), dict)
    ):
        return None  # (damaged or foreign: rebuilt)
    return images, meta["meta"]


def cached_images(
    stem: str,
    key: str,
    build: Callable[[], tuple[Tensor, dict[str, Any]]],
    *,
    enabled: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """Return ``(images, meta)`` from the cache entry ``<stem>-<key>``, building and storing it if absent.

    ``build`` returns a ``uint8`` image tensor and a JSON-serialisable dict. With ``enabled=False``
    the cache is neither read nor written.
    """
    if not enabled:
        return build()
    folder = cache_dir()
    tensor_path = folder / f"{stem}-{key}.safetensors"
    meta_path = folder / f"{stem}-{key}.json"
    hit = _load(tensor_path, meta_path)
    if hit is not None:
        return hit
    images, meta = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Tensors first, metadata last: an entry counts only when both exist.
        write_bytes_atomic(tensor_path, save({"images": images.contiguous()}))
        write_bytes_atomic(meta_path, json.dumps({"format": CACHE_FORMAT, "meta": meta}).encode("utf-8"))
    except OSError as exc:
        warnings.warn(
            f"could not write the data cache in {folder} ({exc}); set METAREG_CACHE to a writable folder "
            "to avoid decoding again next time",
            stacklevel=2,
        )
    return images, meta
