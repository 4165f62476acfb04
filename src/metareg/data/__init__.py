"""Data: episodic task sources (a registry: one file plus one ``register_episodic`` per data set),
labeled image sets for ordinary training (``register_labeled``), their loaders, batches and
augmentation.

The engine only sees :class:`TaskSource` objects; :func:`build_task_source` makes one by name
(:func:`episodic_datasets` lists them: ``glyphs``, generated, no files; ``omniglot``;
``miniimagenet``; ``sine`` and ``polynomial`` regression).
"""

from __future__ import annotations

from metareg.data import glyphs, miniimagenet, omniglot, regression, targets  # noqa: F401  (register the data sets)
from metareg.data.cache import cache_dir
from metareg.data.classes import ClassImages, EpisodeSampler
from metareg.data.download import OMNIGLOT_URL, download_omniglot
from metareg.data.episodic import (
    EpisodicDataset,
    build_task_source,
    episodic_datasets,
    get_episodic,
    register_episodic,
)
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
from metareg.data.roots import default_root
from metareg.data.tasks import TaskBatch, TaskSource

__all__ = [
    "TaskBatch",
    "TaskSource",
    "ClassImages",
    "EpisodeSampler",
    "EpisodicDataset",
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
    "default_root",
    "cache_dir",
    "build_task_source",
    "episodic_datasets",
    "get_episodic",
    "register_episodic",
    "LabeledImages",
    "class_tasks",
    "labeled_datasets",
    "load_labeled",
    "register_labeled",
    "select_classes",
    "split_per_class",
]
