"""Labeled image sets for ordinary (non-episodic) training: MetaPerturb's source tasks and its
transfer targets.

:class:`LabeledImages` is a split of a data set as one ``uint8`` image tensor and one label per
image. Everything that MetaPerturb's experiments do to data sets is a function here:

* :func:`split_per_class`: divide each class's images into a first part and the rest with a fixed
  random order (a data-scarce training set and its test set, or a task's train/test halves);
* :func:`class_tasks`: divide a source data set *class-wise* into T tasks with fixed train/test
  halves (MetaPerturb Section 3.3, Algorithm 1's (D_t^tr, D_t^te));
* :func:`select_classes`: keep a fixed random subset of the classes, relabeled 0..k-1.

Loaders are found by name through :func:`load_labeled`; a new data set is one function registered
with :func:`register_labeled`. The episodic data sets (miniImageNet, Omniglot, glyphs) are
registered here through their :class:`~metareg.data.classes.ClassImages` loaders; the paper's
target sets (STL10, CIFAR-100, SVHN, Stanford Dogs and Cars, Aircraft, CUB, Tiny ImageNet, image
folders, npz files) are in :mod:`metareg.data.targets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..options import check_options
from .classes import ClassImages, ImageSet
from .roots import default_root

__all__ = [
    "LabeledImages",
    "choose_classes",
    "class_tasks",
    "keep_classes",
    "labeled_datasets",
    "load_labeled",
    "register_labeled",
    "select_classes",
    "split_per_class",
    "take_per_class",
]


@dataclass(eq=False)
class LabeledImages(ImageSet):
    """One split of a labeled image data set.

    Args:
        images: ``uint8`` ``[N, C, H, W]``.
        labels: ``long`` ``[N]``, each in ``0 .. len(class_names) - 1``.
        class_names: one name per label.
        dataset, split: names used in error messages and result protocols.
    """

    images: Tensor
    labels: Tensor
    class_names: Sequence[str]
    dataset: str = "dataset"
    split: str = "split"

    def __post_init__(self) -> None:
        where = f"{self.dataset} {self.split} split"
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{where}: images must be a uint8 tensor [N, C, H, W]")
        self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
        self.class_names = list(self.class_names)
        if self.labels.numel() != self.images.shape[0]:
            raise DataError(f"{where}: {self.labels.numel()} labels for {self.images.shape[0]} images")
        if self.images.shape[0] == 0:
            raise DataError(f"{where} holds no images; check the data folder")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names):
            raise DataError(f"{where}: labels must lie in 0..{len(self.class_names) - 1} (one per class name)")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return f"LabeledImages({self.dataset}/{self.split}: {len(self)} images {c}x{h}x{w}, {self.num_classes} classes)"

    def class_counts(self) -> Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Tensor, split: str | None = None) -> LabeledImages:
        """The images at ``indices`` (labels and class names unchanged)."""
        return LabeledImages(
            self.images[indices], self.labels[indices], self.class_names, self.dataset, split or self.split
        )

    @classmethod
    def from_classes(cls, classes: ClassImages) -> LabeledImages:
        """Every image of an episodic data set's split, with its class (rotations applied)."""
        images = [classes.class_images(c) for c in range(classes.num_classes)]
        labels = torch.repeat_interleave(torch.arange(classes.num_classes), torch.tensor([len(x) for x in images]))
        return cls(torch.cat(images), labels, classes.class_names, classes.dataset, classes.split)


def _members(data: LabeledImages, seed: int) -> list[Tensor]:
    """Each class's image indices in a fixed random order (a permutation seeded by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    labels = data.labels[order]
    # A stable sort by label keeps the random order inside each class.
    by_class = order[torch.sort(labels, stable=True).indices]
    return list(torch.split(by_class, data.class_counts().tolist()))


def split_per_class(
    data: LabeledImages,
    first: int,
    seed: int = 0,
    *,
    rest: int | None = None,
    names: tuple[str, str] = ("train", "test"),
) -> tuple[LabeledImages, LabeledImages]:
    """Divide every class: ``first`` images (a fixed random choice given ``seed``) and the others
    (at most ``rest`` of them). The same ``seed`` always gives the same division."""
    where = f"{data.dataset} {data.split} split"
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise DataError(f"{where}: images per class must be a positive integer, got {first!r}")
    counts = data.class_counts()
    need = first + 1 if rest is None else first + rest
    if int(counts.min()) < need:
        small = int(counts.argmin())
        raise DataError(
            f"{where}: class {data.class_names[small]!r} has {int(counts[small])} images; taking {first} per class "
            f"{'and leaving at least one' if rest is None else f'plus {rest} more'} needs {need}"
        )
    members = _members(data, seed)
    head = torch.cat([m[:first] for m in members])
    tail = torch.cat([m[first:] if rest is None else m[first : first + rest] for m in members])
    return data.subset(head, names[0]), data.subset(tail, names[1])


def hold_out(data: LabeledImages, fraction: float, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """(the rest, the held-out part): ``fraction`` of every class's images (at least one, a fixed
    random choice given ``seed``) held out, e.g. as a validation split of the training images."""
    if not 0 < fraction < 1:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
    kept, held = [], []
    for members in _members(data, seed):
        if len(members) < 2:
            raise DataError(
                f"{data.dataset} {data.split} split: a class has {len(members)} image; holding some out needs 2 or more"
            )
        cut = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:cut])
        kept.append(members[cut:])
    return data.subset(torch.cat(kept)), data.subset(torch.cat(held))


def choose_classes(data: LabeledImages, count: int, seed: int = 0) -> Tensor:
    """A fixed random choice of ``count`` of the classes (indices, in the chosen order)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= data.num_classes:
        raise DataError(f"{data.dataset} {data.split} split has {data.num_classes} classes; cannot select {count!r}")
    return torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(seed))[:count]


def select_classes(data: LabeledImages, count: int, seed: int = 0) -> LabeledImages:
    """A fixed random choice of ``count`` classes, relabeled ``0..count-1`` in the chosen order."""
    return keep_classes(data, choose_classes(data, count, seed))


def keep_classes(data: LabeledImages, classes: Tensor) -> LabeledImages:
    """Only the images of ``classes`` (indices), relabeled ``0..len(classes)-1`` in that order."""
    return _relabel(data, torch.as_tensor(classes), data.split)


def take_per_class(data: LabeledImages, count: int, seed: int = 0) -> LabeledImages:
    """At most ``count`` images of each class, a fixed random choice given ``seed``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DataError(
            f"{data.dataset} {data.split} split: images per class must be a positive integer, got {count!r}"
        )
    return data.subset(torch.cat([m[:count] for m in _members(data, seed)]))


def _relabel(data: LabeledImages, classes: Tensor, split: str) -> LabeledImages:
    new_label = torch.full((data.num_classes,), -1, dtype=torch.long)
    new_label[classes] = torch.arange(len(classes))
    keep = (new_label[data.labels] >= 0).nonzero().squeeze(1)
    return LabeledImages(
        data.images[keep],
        new_label[data.labels[keep]],
        [data.class_names[int(c)] for c in classes],
        data.dataset,
        split,
    )


def class_tasks(
    data: LabeledImages, tasks: int, seed: int = 0, train_fraction: float = 0.5
) -> list[tuple[LabeledImages, LabeledImages]]:
    """Divide ``data`` class-wise into ``tasks`` tasks (MetaPerturb's heterogeneous source tasks).

    The classes are shuffled with ``seed`` and cut into ``tasks`` groups of near-equal size; each
    group is a task with labels ``0..k-1``. Inside every class a fixed ``train_fraction`` of the
    images (rounded down, at least one) is the task's training split D_t^tr and the rest its test
    split D_t^te, on which the perturbation is trained. Returns ``[(D_1^tr, D_1^te), ...]``.
    """
    where = f"{data.dataset} {data.split} split"
    if isinstance(tasks, bool) or not isinstance(tasks, int) or not 1 <= tasks <= data.num_classes:
        raise DataError(f"{where} has {data.num_classes} classes; it cannot be divided class-wise into {tasks!r} tasks")
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    counts = data.class_counts()
    if int(counts.min()) < 2:
        raise DataError(
            f"{where}: class {data.class_names[int(counts.argmin())]!r} has fewer than 2 images; "
            "every class needs a train and a test image"
        )
    order = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(seed))
    members = _members(data, seed + 1)
    out = []
    for t, group in enumerate(np.array_split(order.numpy(), tasks)):
        relabel = torch.full((data.num_classes,), -1, dtype=torch.long)
        relabel[torch.as_tensor(group)] = torch.arange(len(group))
        names = [data.class_names[int(c)] for c in group]
        cut = [min(len(members[int(c)]) - 1, max(1, int(len(members[int(c)]) * train_fraction))) for c in group]
        train = torch.cat([members[int(c)][:n] for c, n in zip(group, cut)])
        test = torch.cat([members[int(c)][n:] for c, n in zip(group, cut)])
        train_set, test_set = (
            LabeledImages(data.images[ix], relabel[data.labels[ix]], names, data.dataset, f"task{t}-{part}")
            for ix, part in ((train, "train"), (test, "test"))
        )
        out.append((train_set, test_set))
    return out


def instance_tasks(
    data: LabeledImages, tasks: int, seed: int = 0, train_fraction: float = 0.5
) -> list[tuple[LabeledImages, LabeledImages]]:
    """Divide ``data`` across its *instances* into ``tasks`` tasks (MetaPerturb Table 3(c), the
    homogeneous task distribution): every task holds every class, with a disjoint ``1/tasks`` share
    of each class's images (a fixed random split given ``seed``), and inside every class of a task
    ``train_fraction`` of those images (rounded down, at least one) form D_t^tr, the rest D_t^te.
    Labels are the data set's own in every task."""
    where = f"{data.dataset} {data.split} split"
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise DataError(f"{where}: the number of tasks must be a positive integer, got {tasks!r}")
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    counts = data.class_counts()
    if int(counts.min()) < 2 * tasks:
        raise DataError(
            f"{where}: class {data.class_names[int(counts.argmin())]!r} has {int(counts.min())} images; splitting "
            f"every class across {tasks} tasks needs {2 * tasks} (a train and a test image per task)"
        )
    shares = [torch.tensor_split(m, tasks) for m in _members(data, seed + 1)]
    out = []
    for t in range(tasks):
        parts = [share[t] for share in shares]
        cut = [min(len(m) - 1, max(1, int(len(m) * train_fraction))) for m in parts]
        train = torch.cat([m[:n] for m, n in zip(parts, cut)])
        test = torch.cat([m[n:] for m, n in zip(parts, cut)])
        train_set, test_set = (
            LabeledImages(data.images[ix], data.labels[ix], list(data.class_names), data.dataset, f"task{t}-{part}")
            for ix, part in ((train, "train"), (test, "test"))
        )
        out.append((train_set, test_set))
    return out


# ----------------------------------------------------------------------------------- registry
_LOADERS: dict[str, Callable[..., LabeledImages]] = {}
_NEEDS_ROOT: dict[str, bool] = {}


def register_labeled(name: str, *, needs_root: bool = True) -> Callable:
    """Register ``load(root, split, image_size, **options) -> LabeledImages`` under ``name``
    (``load(split, image_size, **options)`` when ``needs_root`` is false)."""

    def wrap(load: Callable[..., LabeledImages]) -> Callable[..., LabeledImages]:
        if name in _LOADERS:
            raise ValueError(f"labeled data set {name!r} registered twice")
        _LOADERS[name] = load
        _NEEDS_ROOT[name] = needs_root
        return load

    return wrap


def labeled_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_labeled(
    name: str, split: str, *, root: str | Path | None = None, image_size: int = 32, **options: Any
) -> LabeledImages:
    """Load split ``split`` of data set ``name`` at ``image_size`` x ``image_size`` pixels.

    ``root`` defaults to ``$METAREG_DATA_ROOT/<name>``. ``options`` go to the loader; unknown
    ones are a :class:`~metareg.errors.DataError` that lists the valid ones.
    """
    if name not in _LOADERS:
        raise DataError(f"unknown labeled data set {name!r}; available: {', '.join(labeled_datasets())}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    load = _LOADERS[name]
    check_options(load, options, f"data set {name!r}", fixed=("root", "split", "image_size"), error=DataError)
    if not _NEEDS_ROOT[name]:
        return load(split, image_size, **options)
    if root is None:
        base = os.environ.get("METAREG_DATA_ROOT", "").strip()
        if not base:
            raise DataError(
                f"{name} needs its data folder: pass a data root (--data-root / data.root) "
                f"or set METAREG_DATA_ROOT so that $METAREG_DATA_ROOT/{name} holds it"
            )
        root = _default_folder(Path(base).expanduser(), name)
    return load(Path(root).expanduser(), split, image_size, **options)


def _default_folder(base: Path, name: str) -> Path:
    found = default_root(name)  # the episodic data sets' folder conventions
    return found if found is not None else base / name


# ------------------------------------------------------------- the episodic data sets, labeled
@register_labeled("miniimagenet")
def _miniimagenet(root: Path, split: str, image_size: int) -> LabeledImages:
    """miniImageNet's Ravi & Larochelle splits (train 64, val 16, test 20 classes)."""
    from .miniimagenet import load_miniimagenet

    return LabeledImages.from_classes(load_miniimagenet(root, split, image_size))


@register_labeled("omniglot")
def _omniglot(
    root: Path, split: str, image_size: int, class_split: str = "vinyals", rotations: bool = False
) -> LabeledImages:
    """Omniglot characters as classes (20 drawings each); ``rotations=True`` keeps the rotated
    copies as extra classes (the few-shot convention), off by default."""
    from .omniglot import load_omniglot

    classes = load_omniglot(root, split, image_size, class_split)
    data = LabeledImages.from_classes(classes)
    if rotations:
        return data
    upright = (classes.rotations == 0).nonzero().squeeze(1)
    return _relabel(data, upright, split)


@register_labeled("glyphs", needs_root=False)
def _glyphs(
    split: str, image_size: int, seed: int = 0, num_classes: int | None = None, instances_per_class: int = 20
) -> LabeledImages:
    """The built-in generated Omniglot-like characters (no files needed)."""
    from .glyphs import load_glyphs

    return LabeledImages.from_classes(
        load_glyphs(split, image_size, seed, num_classes=num_classes, instances_per_class=instances_per_class)
    )
