"""Dataclass configs, loading from YAML/JSON with overrides, and their validation.

Three kinds of run, one dataclass each:

* :class:`Config` (``metareg train``): episodic meta-learning, six sections (``data``, ``model``,
  ``perturb``, ``inner``, ``train``, ``eval``) plus run-wide fields;
* :class:`MetaTrainConfig` (``metareg perturb meta-train``): MetaPerturb's joint meta-training of a
  perturbation over T source tasks;
* :class:`TransferConfig` (``metareg perturb transfer``): ordinary training of a network on a target
  data set with a fixed perturbation (or none, or fine-tuned from a source network).

Every kind names one idea one way: ``model`` is the network, ``perturb`` the feature perturbation in
its slots (``name``, ``options``), ``train`` the outer optimization (``steps``, ``lr``,
``log_every``, ``checkpoint_every``, ...). Keys of earlier versions (``train.iterations``,
``train.meta_lr``, ``model.perturbation``, the ``optim`` section, ...) are read as their new names
with a one-line notice (:data:`RENAMED`), so old run folders and config files keep working.

Unknown keys are errors, never silently ignored: a typo must not run the wrong experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML's safe loader (no tags, nothing executed) that also reads ``1e-5`` as a number: YAML 1.1
    wants a dot in a float (``1.0e-5``), so ``beta: 1e-5`` would silently become a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


@dataclass
class DataConfig:
    name: str = "glyphs"  # glyphs | omniglot | miniimagenet | sine | polynomial
    root: str | None = None  # data folder; default $METAREG_DATA_ROOT/<name>
    way: int = 5
    shot: int = 1
    query: int = 15
    eval_shot: int | None = None  # shots at meta-test time (default: shot)
    image_size: int | None = None  # default: the data set's own (28 Omniglot, 84 miniImageNet)
    options: dict[str, Any] = field(default_factory=dict)  # data-set specific (class_split, order, ...)
    train_split: str = "train"
    val_split: str | None = "val"  # null: no periodic validation
    test_split: str = "test"
    # cross-domain meta-testing (DropGrad Table 4): the test split of another data set
    test_name: str | None = None  # default: name
    test_root: str | None = None  # its folder (default $METAREG_DATA_ROOT/<test_name>); data.options are name's


@dataclass
class ModelConfig:
    backbone: str = "conv4"  # conv4 | conv6 | mlp | ... (metareg.nets.available())
    # channels, strided, hidden; MAML++'s per_step_weights / per_step_stats (norm_steps = inner.steps)
    options: dict[str, Any] = field(default_factory=dict)
    # a transfer run (same backbone, e.g. supervised pre-training) whose convolutions and batch-norm
    # weights start a fresh run (MetaSGD*'s pre-trained feature extractor)
    init_from: str | None = None


@dataclass
class PerturbSection:
    """The feature perturbation in every slot of the network: any registered one
    (``metareg.perturb.available()``) with its ``options``."""

    name: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class InnerConfig:
    step: str = "sgd"  # sgd (MAML) | meta-sgd | per-step
    lr: float = 0.4
    steps: int = 5
    eval_steps: int | None = None  # default: steps
    first_order: bool = False
    fast: list[str] = field(default_factory=lambda: ["*"])  # glob patterns of adapted parameters
    transforms: list[dict[str, Any]] = field(default_factory=list)  # gradient transforms before the step
    mc_samples: int = 1  # Monte-Carlo samples of the perturbation per inner step (meta-training)
    eval_mc_samples: int = 1  # ... at meta-test time
    # batched: the S samples in one pass (per-copy batch norm); sequential; auto: batched where the model can
    mc_batch: str = "auto"
    # MAML++ (epochs of train.epoch_steps iterations): the multi-step loss during the first so many
    # epochs (0: off), its floor (times the steps), and first-order meta-gradients during the first
    # so many epochs (derivative-order annealing; MAML++'s first_order_to_second_order_epoch E is E + 1)
    multi_step_epochs: int = 0
    multi_step_min: float = 0.03
    first_order_epochs: int = 0


@dataclass
class TrainConfig:
    steps: int = 2000  # meta-iterations
    meta_batch: int = 4
    lr: float = 1e-3  # Adam's learning rate of the meta-parameters (the outer loop)
    clip: float | None = 3.0  # gradient-value clipping to [-clip, clip]; null for none
    val_every: int = 500
    val_episodes: int = 200
    log_every: int = 10
    checkpoint_every: int = 200
    strategy: str = "auto"  # loop | vmap | auto (loop on CPU, vmap on CUDA)
    cuda_graph: bool = True  # on CUDA, capture the whole meta-training step as a graph (eager where impossible)
    epoch_steps: int = 500  # iterations per epoch (MAML++'s total_iter_per_epoch) for the epoch schedules
    lr_schedule: str = "constant"  # constant | cosine (MAML++: annealed per epoch to min_lr)
    min_lr: float = 1e-5  # the cosine schedule's floor (MAML++'s min_learning_rate)


@dataclass
class EvalConfig:
    episodes: int = 1000
    seed: int = 1234  # fixes the test episode stream: every model sees the same episodes
    tasks_per_batch: int = 4


class _RunConfig:
    """A whole run's config: to and from plain dicts (unknown keys are errors; keys of earlier
    versions are read under their new names, see :data:`RENAMED`)."""

    kind: ClassVar[str]  # the kind of run (``bilevel``, ``meta-train``, ``transfer``)
    command: ClassVar[str]  # the command that runs it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        return _build(cls, upgrade(values, cls.kind), "")


@dataclass
class Config(_RunConfig):
    kind: ClassVar[str] = "bilevel"
    command: ClassVar[str] = "metareg train"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    perturb: PerturbSection = field(default_factory=PerturbSection)
    inner: InnerConfig = field(default_factory=InnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    preset: str | None = None


# ------------------------------------------------------------------ MetaPerturb: ordinary training
@dataclass
class ImageDataConfig:
    """A labeled image data set (``metareg.data.load_labeled``) for ordinary training.

    If ``train_split`` and ``test_split`` are the same split, each class's images are divided:
    ``train_per_class`` of them for training, the rest (at most ``test_per_class``) for testing.
    Otherwise ``train_per_class`` subsamples the training split (a data-scarce regime) and
    ``test_per_class`` caps the test split. ``classes`` keeps a random subset of the classes.
    ``seed`` fixes these choices, so every run (any method, any run seed) sees the same images.
    """

    name: str = "miniimagenet"
    root: str | None = None  # default $METAREG_DATA_ROOT/<name>
    image_size: int = 32
    train_split: str = "train"
    test_split: str = "test"
    classes: int | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # loader options (e.g. annotation, labels)


@dataclass
class NetworkConfig:
    backbone: str = "resnet20"  # conv4 | conv6 | vgg9 | resnet20/32/44/56 | resnet18 | wrn-28-2
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Ordinary training (the ``train`` section of MetaPerturb's runs)."""

    steps: int = 10000
    batch_size: int = 128
    lr: float = 1e-3  # Adam
    weight_decay: float = 5e-4
    milestones: list[float] = field(default_factory=lambda: [0.4, 0.7, 0.9])  # fractions of steps where lr *= gamma
    gamma: float = 0.3
    augment: bool = True  # random crop (zero padding 4 px at 32x32, 8 px above) and horizontal flip
    log_every: int = 50
    checkpoint_every: int = 500


@dataclass
class JointOptimConfig(OptimConfig):
    """Joint meta-training (MetaPerturb's Algorithm 1): ordinary training of every task network and phi."""

    steps: int = 750
    milestones: list[float] = field(default_factory=list)
    strategy: str = "auto"  # loop | vmap | auto (loop on CPU, vmap on CUDA)


@dataclass
class PerturbConfig(PerturbSection):
    """The perturbation of MetaPerturb's runs: :class:`PerturbSection` plus MetaPerturb's ``clip``
    and ``anneal``."""

    name: str = "metaperturb"  # meta-train: one with parameters (phi); transfer: any, or none (Base)
    clip: float | None = 100.0  # k: perturbed features are clipped from above at k
    anneal: float = 0.4  # the strength c rises linearly from 0 to 1 over this fraction of the steps (0: always 1)


@dataclass
class TransferPerturbConfig(PerturbConfig):
    phi: str = "builtin"  # MetaPerturb's stored phi: the shipped one, a meta-train run folder, or its phi.json
    mc_samples: int = 100  # Monte-Carlo samples of the final test predictions (noise and scale)


@dataclass
class MetaTrainConfig(_RunConfig):
    kind: ClassVar[str] = "meta-train"
    command: ClassVar[str] = "metareg perturb meta-train"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: NetworkConfig = field(default_factory=NetworkConfig)
    train: JointOptimConfig = field(default_factory=JointOptimConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    tasks: int = 10  # T: the source split class-wise into T tasks
    train_fraction: float = 0.5  # of each class's images in its task's train split D_t^tr
    # classes: T class-disjoint tasks (heterogeneous, the paper's); instances: every task holds every
    # class, each with 1/T of its images (homogeneous, MetaPerturb Table 3(c))
    task_split: str = "classes"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    preset: str | None = None


@dataclass
class TransferConfig(_RunConfig):
    kind: ClassVar[str] = "transfer"
    command: ClassVar[str] = "metareg perturb transfer"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: NetworkConfig = field(default_factory=NetworkConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    perturb: TransferPerturbConfig = field(default_factory=TransferPerturbConfig)
    init_from: str | None = None  # fine-tuning: a transfer run (same backbone) whose convolutions start this one
    select: bool = False  # choose the perturbation's hyperparameters on a validation split of the training images first
    against_base: bool = (
        False  # also train the Base network (no perturbation; same data, seed, test images) into <out>-base
    )
    eval_every: int | None = None  # test accuracy every N steps during training (with eval_mc_samples)
    eval_mc_samples: int = 5
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    preset: str | None = None


#: The three kinds of run by name.
SCHEMAS: dict[str, type[_RunConfig]] = {schema.kind: schema for schema in (Config, MetaTrainConfig, TransferConfig)}

# ------------------------------------------------------------------------------- renamed keys
#: Keys of earlier versions, per kind of run: old dotted key (or section) -> its name now.
RENAMED: dict[str, dict[str, str]] = {
    "bilevel": {
        "train.iterations": "train.steps",
        "train.meta_lr": "train.lr",
        "model.perturbation": "perturb.name",
        "model.perturbation_options": "perturb.options",
    },
    "meta-train": {"optim": "train", "strategy": "train.strategy"},
    "transfer": {"optim": "train"},
}
_noticed: set[str] = set()


def upgrade(values: Any, kind: str) -> Any:
    """``values`` (a partial config of ``kind``) with the keys of earlier versions moved to their
    new names, each announced once per process in one line on stderr. Giving a key under both its
    old and its new name is an error."""
    if not isinstance(values, dict):
        return values
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for old, new in RENAMED.get(kind, {}).items():
        *old_sections, old_key = old.split(".")
        holder = out
        for section in old_sections:
            holder = holder.get(section) if isinstance(holder.get(section), dict) else None
            if holder is None:
                break
        if holder is None or old_key not in holder:
            continue
        value = holder.pop(old_key)
        *new_sections, new_key = new.split(".")
        target = out
        for section in new_sections:
            target.setdefault(section, {})
            if not isinstance(target[section], dict):
                raise ConfigError(f"config key {old!r} is now {new!r}, but {section!r} is not a section")
            target = target[section]
        if isinstance(value, dict) and isinstance(target.get(new_key), dict) and "." not in new:
            clash = set(value) & set(target[new_key])
            if clash:
                raise ConfigError(f"config keys {old}.{min(clash)} and {new}.{min(clash)} are the same key: give one")
            target[new_key] = target[new_key] | value
        elif new_key in target:
            raise ConfigError(f"config keys {old!r} and {new!r} are the same key (renamed): give only {new!r}")
        else:
            target[new_key] = value
        if old not in _noticed:
            _noticed.add(old)
            print(f"metareg: note: config key {old!r} is now {new!r} (read as such)", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------- building
def _type_ok(value: Any, hint: Any) -> Any:
    """Check (and gently coerce: int -> float) ``value`` against a type hint; raise TypeError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _type_ok(value, option)
            except TypeError:
                pass
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item,) = typing.get_args(hint)
        return [_type_ok(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError from None
    if hint is int and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, hint):
        raise TypeError
    return value


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where or 'top level'!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{path}.")
            continue
        try:
            kwargs[key] = _type_ok(value, hint)
        except TypeError:
            raise ConfigError(f"config key {path!r} must be {_hint_name(hint)}, got {value!r}") from None
    return cls(**kwargs)


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into ``base`` (dataclass sections merge key by key)."""
    out = dict(base)
    for key, value in override.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and key not in ("options", "perturbation_options")
        ):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_assignment(text: str) -> dict[str, Any]:
    """``"train.iterations=100"`` -> ``{"train": {"iterations": 100}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    keys = path.strip().split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return values


def _check_finite(values: Any, where: str = "") -> None:
    """Every number in a config (options included) is finite: ``nan <= 0`` is False, so a NaN
    would slip through every range check after this one."""
    if isinstance(values, dict):
        for key, value in values.items():
            _check_finite(value, f"{where}{key}.")
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            _check_finite(value, f"{where}{i}.")
    elif isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"config key {where[:-1]!r} must be a finite number, got {values}")


def _check_positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def _validate_ordinary(config: MetaTrainConfig | TransferConfig) -> None:
    """Checks shared by the MetaPerturb runs."""
    d, o, p = config.data, config.train, config.perturb
    _check_positive(
        {
            "data.image_size": d.image_size,
            "data.classes": d.classes,
            "data.train_per_class": d.train_per_class,
            "data.test_per_class": d.test_per_class,
            "train.batch_size": o.batch_size,
            "train.log_every": o.log_every,
            "train.checkpoint_every": o.checkpoint_every,
        }
    )
    if o.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {o.steps}")
    if o.lr <= 0 or o.weight_decay < 0 or not 0 < o.gamma <= 1:
        raise ConfigError("train.lr must be positive, train.weight_decay >= 0 and train.gamma in (0, 1]")
    if any(not 0 < m < 1 for m in o.milestones) or sorted(o.milestones) != list(o.milestones):
        raise ConfigError(f"train.milestones must be increasing fractions of the steps in (0, 1), got {o.milestones}")
    if not 0 <= p.anneal <= 1:
        raise ConfigError(f"perturb.anneal must be a fraction of the steps in [0, 1], got {p.anneal}")
    if p.clip is not None and p.clip <= 0:
        raise ConfigError(f"perturb.clip must be positive or null, got {p.clip}")
    if config.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {config.dtype!r}")


def validate(config: Any) -> None:
    """Checks that span fields (single fields are type-checked while building)."""
    _check_finite(config.to_dict())
    if isinstance(config, MetaTrainConfig):
        _validate_ordinary(config)
        _check_positive({"tasks": config.tasks})
        if not 0 < config.train_fraction < 1:
            raise ConfigError(f"train_fraction must be in (0, 1), got {config.train_fraction}")
        if config.task_split not in ("classes", "instances"):
            raise ConfigError(f"task_split must be classes or instances, got {config.task_split!r}")
        if config.train.strategy not in ("auto", "loop", "vmap"):
            raise ConfigError(f"train.strategy must be auto, loop or vmap, got {config.train.strategy!r}")
        return
    if isinstance(config, TransferConfig):
        _validate_ordinary(config)
        _check_positive(
            {
                "perturb.mc_samples": config.perturb.mc_samples,
                "eval_mc_samples": config.eval_mc_samples,
                "eval_every": config.eval_every,
            }
        )
        if config.data.train_split == config.data.test_split and config.data.train_per_class is None:
            raise ConfigError(
                f"train and test images both come from split {config.data.train_split!r}: set data.train_per_class "
                "(images of each class for training; the rest are for testing)"
            )
        return
    positive = {
        "data.way": config.data.way,
        "data.shot": config.data.shot,
        "data.query": config.data.query,
        "inner.steps": config.inner.steps,
        "inner.mc_samples": config.inner.mc_samples,
        "inner.eval_mc_samples": config.inner.eval_mc_samples,
        "train.meta_batch": config.train.meta_batch,
        "train.log_every": config.train.log_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.val_every": config.train.val_every,
        "eval.episodes": config.eval.episodes,
        "eval.tasks_per_batch": config.eval.tasks_per_batch,
        "train.epoch_steps": config.train.epoch_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if config.train.steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {config.train.steps}")
    if config.train.strategy not in ("auto", "loop", "vmap"):
        raise ConfigError(f"train.strategy must be auto, loop or vmap, got {config.train.strategy!r}")
    if config.inner.mc_batch not in ("auto", "batched", "sequential"):
        raise ConfigError(f"inner.mc_batch must be auto, batched or sequential, got {config.inner.mc_batch!r}")
    if config.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {config.dtype!r}")
    if config.inner.lr <= 0 or config.train.lr <= 0:
        raise ConfigError("inner.lr and train.lr must be positive")
    if config.train.clip is not None and config.train.clip <= 0:
        raise ConfigError(f"train.clip must be positive or null (no clipping), got {config.train.clip}")
    if config.inner.multi_step_epochs < 0 or config.inner.first_order_epochs < 0:
        raise ConfigError("inner.multi_step_epochs and inner.first_order_epochs must be >= 0")
    if not 0 <= config.inner.multi_step_min <= 1:
        raise ConfigError(f"inner.multi_step_min must be in [0, 1], got {config.inner.multi_step_min}")
    if config.train.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine, got {config.train.lr_schedule!r}")
    if config.train.lr_schedule == "cosine" and not 0 < config.train.min_lr <= config.train.lr:
        raise ConfigError(f"train.min_lr must be in (0, train.lr] for the cosine schedule, got {config.train.min_lr}")
