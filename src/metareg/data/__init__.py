"""Data: episodic task sources (a registry: one file plus one ``register_episodic`` per data set),
labeled image sets for ordinary training (``register_labeled``), their loaders, batches and
augmentation.

The engine only sees :class:`TaskSource` objects; :func:`build_task_source` makes one by name
(:func:`episodic_datasets` lists them: ``glyphs``, generated, no files; ``omniglot``;
``miniimagenet``; ``sine`` and ``polynomial`` regression).
"""

from __future__ import annotations

from . import cub, glyphs, miniimagenet, omniglot, regression, targets  # noqa: F401  (register the data sets)
from .cache import cache_dir
from .classes import ClassImages, EpisodeSampler
from .download import OMNIGLOT_URL, download_omniglot
from .episodic import (
    EpisodicDataset,
    build_task_source,
    episodic_datasets,
    get_episodic,
    register_episodic,
)
from .glyphs import GLYPH_SPLITS, load_glyphs
from .labeled import (
    LabeledImages,
    class_tasks,
    instance_tasks,
    labeled_datasets,
    load_labeled,
    register_labeled,
    select_classes,
    split_per_class,
)
from .miniimagenet import MINIIMAGENET_SPLITS, load_miniimagenet
from .omniglot import VINYALS_SPLITS, load_omniglot
from .regression import PolynomialTasks, SineTasks
from .roots import default_root
from .tasks import TaskBatch, TaskSource

__all__ = [
    "GLYPH_SPLITS",
    "MINIIMAGENET_SPLITS",
    "OMNIGLOT_URL",
    "VINYALS_SPLITS",
    "ClassImages",
    "EpisodeSampler",
    "EpisodicDataset",
    "LabeledImages",
    "PolynomialTasks",
    "SineTasks",
    "TaskBatch",
    "TaskSource",
    "build_task_source",
    "cache_dir",
    "class_tasks",
    "default_root",
    "download_omniglot",
    "episodic_datasets",
    "get_episodic",
    "instance_tasks",
    "labeled_datasets",
    "load_glyphs",
    "load_labeled",
    "load_miniimagenet",
    "load_omniglot",
    "register_episodic",
    "register_labeled",
    "select_classes",
    "split_per_class",
]
