"""Where data sets live on disk: ``--data-root`` / ``data.root``, else ``$METAREG_DATA_ROOT/<name>``."""

from __future__ import annotations

import os
from pathlib import Path

# Folder names tried under $METAREG_DATA_ROOT, in order.
_ROOT_NAMES = {"omniglot": ("omniglot",), "miniimagenet": ("miniimagenet", "miniimagenet-100")}


def default_root(name: str) -> Path | None:
    """``$METAREG_DATA_ROOT/<name>`` if the variable is set (for miniImageNet, ``miniimagenet-100``
    is tried when ``miniimagenet`` does not exist), else ``None``."""
    base = os.environ.get("METAREG_DATA_ROOT", "").strip()
    if not base:
        return None
    names = _ROOT_NAMES.get(name, (name,))
    candidates = [Path(base).expanduser() / n for n in names]
    return next((c for c in candidates if c.exists()), candidates[0])
