"""Few-shot task sources: image data sets split by class, episode sampling, regression families.

The engine only sees :class:`TaskSource` objects; :func:`build_task_source` makes one by name:

========================  ===========================================================  ==========
name                      what                                                         needs files
========================  ===========================================================  ==========
``glyphs``                generated Omniglot-like characters (:mod:`.glyphs`)           no
``omniglot``              Omniglot, Vinyals split by default (:mod:`.omniglot`)         yes
``miniimagenet``          miniImageNet, Ravi & Larochelle csv layout (:mod:`.miniimagenet`)  yes
``sine``                  sinusoid regression (:mod:`.regression`)                     no
``polynomial``            polynomial regression, needs ``order=`` (:mod:`.regression`)  no
========================  ===========================================================  ==========
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metareg.data.cache import cache_dir
from metareg.data.classes import ClassImages, EpisodeSampler
from metareg.data.download import OMNIGLOT_URL, download_omniglot
from metareg.data.glyphs import GLYPH_SPLITS, load_glyphs
from metareg.data.labeled import (
    LabeledImages,
    class_tasks,
    labeled_datasets,
    load_labeled,
    register_labeled,
    select_classes,
    split_per_class,
)
from metareg.data.miniimagenet import MINIIMAGENET_SPLITS, load_miniimagenet
from metareg.data.omniglot import VINYALS_SPLITS, load_omniglot
from metareg.data.regression import PolynomialTasks, SineTasks
from metareg.data.tasks import TaskBatch, TaskSource
from metareg.data import targets  # noqa: F401,E402  (registers the transfer target loaders)
from metareg.errors import DataError

__all__ = [
    "TaskBatch",
    "TaskSource",
    "ClassImages",
    "EpisodeSampler",
    "load_glyphs",
    "load_omniglot",
    "load_miniimagenet",
    "SineTasks",
    "PolynomialTasks",
    "download_omniglot",
    "OMNIGLOT_URL",
    "GLYPH_SPLITS",
    "VINYALS_SPLITS",
    "MINIIMAGENET_SPLITS",
    "DATASETS",
    "IMAGE_DATASETS",
    "default_root",
    "cache_dir",
    "build_task_source",
    "LabeledImages",
    "class_tasks",
    "labeled_datasets",
    "load_labeled",
    "register_labeled",
    "select_classes",
    "split_per_class",
]

IMAGE_DATASETS = ("glyphs", "omniglot", "miniimagenet")
DATASETS = (*IMAGE_DATASETS, "sine", "polynomial")

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


def _check_options(name: str, factory: Callable[..., Any], handled: set[str], kwargs: dict[str, Any]) -> None:
    allowed = [p for p in inspect.signature(factory).parameters if p not in handled]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise DataError(f"unknown option(s) {', '.join(unknown)} for data set {name!r}; valid options: {valid}")


def build_task_source(
    name: str,
    split: str,
    *,
    way: int,
    shot: int,
    query: int,
    root: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> TaskSource:
    """Make the task source ``name`` for ``split``.

    Args:
        name: one of :data:`DATASETS`.
        split: the data set's split (``train``/``val``/``test``; Omniglot and glyphs also
            ``trainval``). Ignored by the regression families, whose tasks are all drawn alike.
        way, shot, query: classes per task, support and query examples per class (regression:
            ``shot`` and ``query`` points per task; ``way`` is ignored).
        root: data folder for ``omniglot`` / ``miniimagenet``; defaults to ``$METAREG_DATA_ROOT/<name>``.
        image_size: image side in pixels (default 28 for glyphs and Omniglot, 84 for miniImageNet).
        seed: the glyph data set's seed (which characters exist); episode sampling randomness comes
            from the generator passed to ``sample``.
        **kwargs: extra options of the loader or task family, e.g. ``class_split="alphabets"``
            (omniglot), ``num_classes`` / ``instances_per_class`` (glyphs), ``order`` (polynomial,
            required), ``amplitude`` / ``frequency`` / ``phase`` / ``x_range`` (sine).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "sine":
        _check_options(name, SineTasks, {"shot", "query"}, kwargs)
        return SineTasks(shot, query, **kwargs)
    if name == "polynomial":
        _check_options(name, PolynomialTasks, {"shot", "query"}, kwargs)
        if "order" not in kwargs:
            raise DataError("polynomial tasks need an order: pass order=N (e.g. order=2)")
        return PolynomialTasks(shot, query, **kwargs)

    size = {} if image_size is None else {"image_size": image_size}
    if name == "glyphs":
        _check_options(name, load_glyphs, {"split", "image_size", "seed"}, kwargs)
        classes = load_glyphs(split, seed=seed, **size, **kwargs)
    else:
        if root is None:
            root = default_root(name)
        if root is None:
            raise DataError(f"{name} needs its data folder: pass a data root (root=... / --data-root) "
                            f"or set METAREG_DATA_ROOT so that $METAREG_DATA_ROOT/{name} holds the data")
        loader = load_omniglot if name == "omniglot" else load_miniimagenet
        _check_options(name, loader, {"root", "split", "image_size"}, kwargs)
        classes = loader(root, split, **size, **kwargs)
    return EpisodeSampler(classes, way, shot, query)
