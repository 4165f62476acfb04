"""Images grouped by class, and the N-way K-shot episode sampler that draws tasks from them.

:class:`ClassImages` holds one split of an image data set (Omniglot, miniImageNet, glyphs): every
image once, as a ``uint8`` tensor, plus which images belong to which class. A class may also carry
a rotation (Omniglot's ``rot090`` classes are the ``rot000`` images turned by 90 degrees), so the
rotated classes cost no memory: the few images of an episode are rotated when they are sampled.

:class:`EpisodeSampler` turns a :class:`ClassImages` into a :class:`~metareg.data.tasks.TaskSource`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import DataError
from .tasks import TaskBatch

__all__ = ["ClassImages", "EpisodeSampler", "ImageSet"]


class ImageSet:
    """What every split of an image data set offers: its class names and its images' shape."""

    images: Tensor
    class_names: Sequence[str]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclass(eq=False)
class ClassImages(ImageSet):
    """The images of one split of a data set, grouped by class.

    Args:
        images: all images of the split, ``uint8`` ``[M, C, H, W]``; each stored once.
        class_indices: one 1-D integer tensor per class, the rows of ``images`` in that class.
            Classes may share images (rotated copies of one character) and may differ in size.
        class_names: one name per class, e.g. ``"Latin/character01/rot090"`` or ``"n01532829"``.
        rotations: optional per-class number ``k`` in 0..3 of counter-clockwise quarter turns
            (``torch.rot90`` / ``np.rot90`` convention) applied to the class's images when sampled.
            ``None`` means no rotation. Odd ``k`` needs square images.
        dataset: the data set's name, used in error messages (``"omniglot"``).
        split: the split's name, used in error messages (``"test"``).

    Derived attributes: ``index_table`` (``[N, max_size]`` long, each row a class's image rows,
    padded with -1) and ``class_sizes`` (``[N]`` long) let the sampler gather without Python loops.
    """

    images: Tensor
    class_indices: Sequence[Tensor]
    class_names: Sequence[str]
    # None: no rotations (all zeros, set by __post_init__, after which it is always a tensor)
    rotations: Tensor = None  # type: ignore[assignment]
    dataset: str = "dataset"
    split: str = "split"
    index_table: Tensor = field(init=False, repr=False)
    class_sizes: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"{self.dataset} {self.split} split"
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{where}: images must be a uint8 tensor [M, C, H, W]; rebuild the data set")
        num_classes = len(self.class_indices)
        if num_classes == 0:
            raise DataError(f"{where} has no classes; check the data folder and the split files")
        if len(self.class_names) != num_classes:
            raise DataError(
                f"{where}: {len(self.class_names)} class names for {num_classes} classes; rebuild the data set"
            )
        self.class_names = list(self.class_names)
        indices = [torch.as_tensor(ix, dtype=torch.long).reshape(-1) for ix in self.class_indices]
        self.class_indices = indices
        sizes = torch.tensor([len(ix) for ix in indices], dtype=torch.long)
        if int(sizes.min()) == 0:
            empty = self.class_names[int(sizes.argmin())]
            raise DataError(f"{where}: class {empty!r} has no images; check the data folder")
        flat = torch.cat(indices)
        if int(flat.min()) < 0 or int(flat.max()) >= self.images.shape[0]:
            raise DataError(f"{where}: a class refers to an image that does not exist; rebuild the data set")
        table = torch.full((num_classes, int(sizes.max())), -1, dtype=torch.long)
        for row, ix in enumerate(indices):
            table[row, : len(ix)] = ix
        # Distinct rows within each class (else "distinct instances" would not hold).
        owner = torch.repeat_interleave(torch.arange(num_classes), sizes)
        if torch.unique(owner * self.images.shape[0] + flat).numel() != flat.numel():
            raise DataError(f"{where}: a class lists the same image twice; rebuild the data set")
        self.index_table = table
        self.class_sizes = sizes

        if self.rotations is None:
            self.rotations = torch.zeros(num_classes, dtype=torch.long)
        else:
            self.rotations = torch.as_tensor(self.rotations, dtype=torch.long).reshape(-1)
            if self.rotations.numel() != num_classes:
                raise DataError(f"{where}: {self.rotations.numel()} rotations for {num_classes} classes")
            if bool(((self.rotations < 0) | (self.rotations > 3)).any()):
                raise DataError(f"{where}: rotations must be quarter turns k in 0..3")
        height, width = self.images.shape[-2:]
        if height != width and bool((self.rotations % 2 == 1).any()):
            raise DataError(f"{where}: 90/270 degree rotations need square images, got {height}x{width}")

    def __len__(self) -> int:
        return self.num_classes

    def class_images(self, c: int) -> Tensor:
        """The ``uint8`` images of class ``c`` (rotation applied), ``[n_c, C, H, W]``."""
        x = self.images[self.class_indices[c]]
        k = int(self.rotations[c])
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    def smallest_class(self) -> tuple[str, int]:
        """Name and size of the smallest class."""
        i = int(self.class_sizes.argmin())
        return self.class_names[i], int(self.class_sizes[i])


def _positive_int(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


class EpisodeSampler:
    """N-way K-shot episodes drawn from a :class:`ClassImages` (a classification ``TaskSource``).

    Each task of :meth:`sample`:

    * picks ``way`` distinct classes uniformly at random;
    * gives them the labels ``0..way-1`` in a random order (a fresh permutation per task, so a
      label never means the same class across episodes);
    * draws ``shot + query`` *distinct* images of each class: the first ``shot`` form the support
      set and the rest the query set, so support and query never share an image.

    Examples are arranged **class-major** inside the support and the query set: support example
    ``i`` has label ``i // shot`` (``[0]*shot + [1]*shot + ...``), query example ``j`` has label
    ``j // query``. Since the label-to-class map is random per task, this order carries no
    information about the classes; models that care about order (none here: the engine's
    convolutional nets treat a set as a batch) can permute it themselves.

    Images come back as float32 in [0, 1]. All randomness comes from the given generator: the same
    generator state gives the same batch. The Python work per call is a handful of tensor ops
    (independent of ``way``, ``shot`` and the number of tasks); images are gathered in one indexing
    op and only the sampled images of rotated classes are rotated.

    On a GPU, :meth:`to` moves the images there once (``uint8``, a few tens of MB): the episode's
    indices are still drawn on the CPU from the same generator (the same episodes for a seed on
    every device), only they cross to the device, and the gather, rotation and conversion to float
    run there, with no host synchronization.
    """

    is_classification = True

    def __init__(self, classes: ClassImages, way: int, shot: int, query: int) -> None:
        where = f"{classes.dataset} {classes.split} split"
        self.way = _positive_int(way, "way", where)
        self.shot = _positive_int(shot, "shot", where)
        self.query = _positive_int(query, "query", where)
        if way > classes.num_classes:
            raise DataError(
                f"{where} has {classes.num_classes} classes; way={way} is impossible (use way <= {classes.num_classes})"
            )
        name, size = classes.smallest_class()
        if shot + query > size:
            raise DataError(
                f"{where}: its smallest class {name!r} has {size} images; "
                f"shot+query={shot}+{query}={shot + query} is impossible (use shot+query <= {size})"
            )
        self.classes = classes
        self.images = classes.images  # where the gather happens (see :meth:`to`)
        self.rotated = bool((classes.rotations != 0).any())
        self.square = classes.image_shape[-1] == classes.image_shape[-2]

    def to(self, device: torch.device | str) -> EpisodeSampler:
        """The same sampler with its images on ``device`` (the index tables stay on the CPU)."""
        moved = copy.copy(self)
        moved.images = self.images.to(device)
        return moved

    def __repr__(self) -> str:
        c = self.classes
        return (
            f"EpisodeSampler({c.dataset}/{c.split}: {c.num_classes} classes, "
            f"way={self.way}, shot={self.shot}, query={self.query})"
        )

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` episodes stacked: ``support_x [B, way*shot, C, H, W]``, ``support_y [B, way*shot]``."""
        return self.gather(*self.draw(num_tasks, generator))

    def draw(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The random part of :meth:`sample`, on the CPU: the image rows ``[B, way, n]`` of the
        episodes (class-major, label = position) and each image's quarter turns ``[B*way*n]``."""
        c = self.classes
        b = _positive_int(num_tasks, "num_tasks", f"{c.dataset} {c.split} split")
        way, n = self.way, self.shot + self.query

        # Classes: the `way` largest of N iid uniform keys form a uniform random subset, already
        # in uniformly random order; position in that order is the label.
        chosen = torch.rand(b, c.num_classes, generator=generator).topk(way, dim=1).indices  # [B, way]

        # Instances: the n smallest of iid keys over each class's members, padding keys set above 1
        # so they are never picked (n <= smallest class size): n distinct images per class.
        sizes = c.class_sizes[chosen]  # [B, way]
        keys = torch.rand(b, way, c.index_table.shape[1], generator=generator)
        keys.masked_fill_(torch.arange(keys.shape[-1]) >= sizes.unsqueeze(-1), 2.0)
        slots = keys.topk(n, dim=-1, largest=False).indices  # [B, way, n]
        rows = c.index_table[chosen.unsqueeze(-1), slots]  # [B, way, n]
        turns = c.rotations[chosen].unsqueeze(-1).expand(b, way, n).reshape(-1)
        return rows, turns

    def gather(self, rows: Tensor, turns: Tensor) -> TaskBatch:
        """The episodes of :meth:`draw`'s indices, gathered where the images are. Fixed shapes and no
        data-dependent control flow: on a GPU this runs without host synchronization and can be
        captured in a CUDA graph (with ``rows`` and ``turns`` in static device buffers)."""
        c = self.classes
        b, way, n = rows.shape
        device = self.images.device
        x = self.images[rows.reshape(-1).to(device, non_blocking=True)]  # [B*way*n, C, H, W] uint8, one gather
        if self.rotated:  # Omniglot's rotated classes: every image turned by its class's quarter turns
            turns = turns.to(device, non_blocking=True).view(-1, 1, 1, 1)
            x = torch.where(turns == 1, torch.rot90(x, 1, dims=(-2, -1)), x.clone()) if self.square else x
            x = torch.where(turns == 2, torch.rot90(x, 2, dims=(-2, -1)), x)
            x = torch.where(turns == 3, torch.rot90(x, 3, dims=(-2, -1)), x) if self.square else x
        x = x.to(torch.float32).div_(255.0).reshape(b, way, n, *c.image_shape)

        shot, query = self.shot, self.query
        labels = torch.arange(way, device=device)
        support_x = x[:, :, :shot].reshape(b, way * shot, *c.image_shape)
        query_x = x[:, :, shot:].reshape(b, way * query, *c.image_shape)
        support_y = labels.repeat_interleave(shot).expand(b, -1).contiguous()
        query_y = labels.repeat_interleave(query).expand(b, -1).contiguous()
        return TaskBatch(support_x, support_y, query_x, query_y)
