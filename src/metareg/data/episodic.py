"""The episodic data sets, by name: one registration each (``register_episodic``).

An entry says how to build its :class:`~metareg.data.tasks.TaskSource` for a split and what its
inputs are (channels and default image size, or a regression family), so that the engine, the
config validation and the command line learn about a new data set from its registration alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..options import check_options
from .classes import ClassImages, EpisodeSampler
from .roots import default_root
from .tasks import TaskSource


@dataclass(frozen=True)
class EpisodicDataset:
    """``load`` returns the split's :class:`ClassImages` (image sets: ``load(split, image_size,
    root=..., seed=..., **options)``, ``root`` only when ``needs_root``) or the task family itself
    (regression: ``load(shot, query, **options)``)."""

    name: str
    load: Callable[..., Any]
    channels: int = 1  # input channels (features, for regression)
    image_size: int | None = None  # default image side; None for regression
    regression: bool = False
    needs_root: bool = False
    description: str = ""
    handled: tuple[str, ...] = ()  # the loader's parameters that are not user options


_EPISODIC: dict[str, EpisodicDataset] = {}


def register_episodic(entry: EpisodicDataset) -> EpisodicDataset:
    if entry.name in _EPISODIC:
        raise ValueError(f"episodic data set {entry.name!r} registered twice")
    _EPISODIC[entry.name] = entry
    return entry


def episodic_datasets() -> list[str]:
    return sorted(_EPISODIC)


def get_episodic(name: str) -> EpisodicDataset:
    if name not in _EPISODIC:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(episodic_datasets())}")
    return _EPISODIC[name]


def _check_options(entry: EpisodicDataset, kwargs: dict[str, Any]) -> None:
    check_options(entry.load, kwargs, f"data set {entry.name!r}", fixed=entry.handled, error=DataError)


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
        name: a registered episodic data set (:func:`episodic_datasets`).
        split: the data set's split (``train``/``val``/``test``; Omniglot and glyphs also
            ``trainval``). Ignored by the regression families, whose tasks are all drawn alike.
        way, shot, query: classes per task, support and query examples per class (regression:
            ``shot`` and ``query`` points per task; ``way`` is ignored).
        root: data folder for data sets on disk; defaults to ``$METAREG_DATA_ROOT/<name>``.
        image_size: image side in pixels (default: the data set's own).
        seed: the generated data set's seed (which glyphs exist); episode sampling randomness comes
            from the generator passed to ``sample``.
        **kwargs: extra options of the loader or task family, e.g. ``class_split="alphabets"``
            (omniglot), ``num_classes`` / ``instances_per_class`` (glyphs), ``order`` (polynomial,
            required), ``amplitude`` / ``frequency`` / ``phase`` / ``x_range`` (sine).
    """
    entry = get_episodic(name)
    _check_options(entry, kwargs)
    if entry.regression:
        return entry.load(shot, query, **kwargs)
    size = {} if image_size is None else {"image_size": image_size}
    if entry.needs_root:
        root = root if root is not None else default_root(name)
        if root is None:
            raise DataError(
                f"{name} needs its data folder: pass a data root (root=... / --data-root) "
                f"or set METAREG_DATA_ROOT so that $METAREG_DATA_ROOT/{name} holds the data"
            )
        classes: ClassImages = entry.load(root, split, **size, **kwargs)
    else:
        classes = entry.load(split, seed=seed, **size, **kwargs)
    return EpisodeSampler(classes, way, shot, query)
