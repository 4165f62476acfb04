"""Where data sets live on disk: ``--data-root`` / ``data.root``, else ``$METAREG_DATA_ROOT/<name>``."""

from __future__ import annotations

import os
from pathlib import Path

# Folder names tried under $METAREG_DATA_ROOT, in order.
_ROOT_NAMES = {"omniglot": ("omniglot",), "miniimagenet": ("miniimagenet", "miniimagenet-100")}


def check_root(root: Path, title: str, advice: str) -> Path:
    """``root`` if it is a folder; else a one-line DataError that says whether it is missing or a
    file (``advice``: how to get the data)."""
    if root.is_dir():
        return root
    from ..errors import DataError

    if root.exists():
        raise DataError(f"{title} root {root} is a file, not a folder; point it at the data set's folder ({advice})")
    raise DataError(f"{title} root {root} does not exist; {advice}")


def default_root(name: str) -> Path | None:
    """``$METAREG_DATA_ROOT/<name>`` if the variable is set (for miniImageNet, ``miniimagenet-100``
    is tried when ``miniimagenet`` does not exist), else ``None``."""
    base = os.environ.get("METAREG_DATA_ROOT", "").strip()
    if not base:
        return None
    names = _ROOT_NAMES.get(name, (name,))
    candidates = [Path(base).expanduser() / n for n in names]
    return next((c for c in candidates if c.exists()), candidates[0])
