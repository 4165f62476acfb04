"""Dataclass configs, loading from YAML/JSON with overrides, and their validation.

Three kinds of run, one dataclass each:

* :class:`Config` (``metareg train``): episodic meta-learning, five sections (``data``, ``model``,
  ``inner``, ``train``, ``eval``) plus run-wide fields;
* :class:`MetaTrainConfig` (``metareg perturb meta-train``): MetaPerturb's joint meta-training of a
  perturbation over T source tasks;
* :class:`TransferConfig` (``metareg perturb transfer``): ordinary training of a network on a target
  data set with a fixed perturbation (or none, or fine-tuned from a source network).

Unknown keys are errors, never silently ignored: a typo must not run the wrong experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class ModelConfig:
    backbone: str = "conv4"  # conv4 | conv6 | mlp
    options: dict[str, Any] = field(default_factory=dict)  # channels, strided, hidden
    perturbation: str = "none"
    perturbation_options: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class TrainConfig:
    iterations: int = 2000
    meta_batch: int = 4
    meta_lr: float = 1e-3
    clip: float | None = 3.0  # gradient-value clipping to [-clip, clip]; null for none
    val_every: int = 500
    val_episodes: int = 200
    log_every: int = 10
    checkpoint_every: int = 200
    strategy: str = "auto"  # loop | vmap | parallel (CPU processes) | auto (see runs.common.resolve_strategy)
    cuda_graph: bool = True  # on CUDA, capture the whole meta-training step as a graph (eager where impossible)
    workers: int | None = None  # processes of the parallel strategy (default: the CPU cores available)
    recompute: bool = False  # rebuild each second-order inner step's graph in the meta-backward instead of storing it
    precision: str = "float32"  # float32 | bf16 (autocast for the inner and outer passes, float32 master weights)
    task_chunk: int | None = None  # vmap: tasks per chunk of the meta-batch (default: all at once)
    memory_budget: float | None = None  # vmap: MiB a chunk of tasks may take (the chunk size is derived from it)


@dataclass
class EvalConfig:
    episodes: int = 1000
    seed: int = 1234  # fixes the test episode stream: every model sees the same episodes
    tasks_per_batch: int = 4


class _RunConfig:
    """A whole run's config: to and from plain dicts (unknown keys are errors)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        return _build(cls, values, "")


@dataclass
class Config(_RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
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
class PerturbConfig:
    """The perturbation in a network's slots: any registered one (``metareg.perturb.available()``)
    with its ``options``; ``clip`` and ``anneal`` are MetaPerturb's settings."""

    name: str = "metaperturb"  # meta-train: one with parameters (phi); transfer: any, or none (Base)
    options: dict[str, Any] = field(default_factory=dict)
    clip: float | None = 100.0  # k: perturbed features are clipped from above at k
    anneal: float = 0.4  # the strength c rises linearly from 0 to 1 over this fraction of the steps (0: always 1)


@dataclass
class TransferPerturbConfig(PerturbConfig):
    phi: str = "builtin"  # MetaPerturb's stored phi: the shipped one, a meta-train run folder, or its phi.json
    mc_samples: int = 100  # Monte-Carlo samples of the final test predictions (noise and scale)


@dataclass
class MetaTrainConfig(_RunConfig):
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=750, milestones=[]))
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    tasks: int = 10  # T: the source split class-wise into T tasks
    train_fraction: float = 0.5  # of each class's images in its task's train split D_t^tr
    strategy: str = "auto"  # loop | vmap | auto (loop on CPU, vmap on CUDA)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    preset: str | None = None


@dataclass
class TransferConfig(_RunConfig):
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
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
    d, o, p = config.data, config.optim, config.perturb
    _check_positive(
        {
            "data.image_size": d.image_size,
            "data.classes": d.classes,
            "data.train_per_class": d.train_per_class,
            "data.test_per_class": d.test_per_class,
            "optim.batch_size": o.batch_size,
            "optim.log_every": o.log_every,
            "optim.checkpoint_every": o.checkpoint_every,
        }
    )
    if o.steps < 0:
        raise ConfigError(f"optim.steps must be >= 0, got {o.steps}")
    if o.lr <= 0 or o.weight_decay < 0 or not 0 < o.gamma <= 1:
        raise ConfigError("optim.lr must be positive, optim.weight_decay >= 0 and optim.gamma in (0, 1]")
    if any(not 0 < m < 1 for m in o.milestones) or sorted(o.milestones) != list(o.milestones):
        raise ConfigError(f"optim.milestones must be increasing fractions of the steps in (0, 1), got {o.milestones}")
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
        if config.strategy not in ("auto", "loop", "vmap"):
            raise ConfigError(f"strategy must be auto, loop or vmap, got {config.strategy!r}")
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
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if config.train.iterations < 0:
        raise ConfigError(f"train.iterations must be >= 0, got {config.train.iterations}")
    if config.train.strategy not in ("auto", "loop", "vmap", "parallel"):
        raise ConfigError(f"train.strategy must be auto, loop, vmap or parallel, got {config.train.strategy!r}")
    if config.train.precision not in ("float32", "bf16"):
        raise ConfigError(f"train.precision must be float32 or bf16, got {config.train.precision!r}")
    if config.train.precision == "bf16" and config.dtype != "float32":
        raise ConfigError("train.precision=bf16 keeps float32 master weights: set dtype to float32")
    _check_positive({"train.workers": config.train.workers, "train.task_chunk": config.train.task_chunk})
    if config.train.memory_budget is not None and config.train.memory_budget <= 0:
        raise ConfigError(f"train.memory_budget must be a positive number of MiB, got {config.train.memory_budget}")
    if config.train.task_chunk is not None and config.train.memory_budget is not None:
        raise ConfigError("give train.task_chunk or train.memory_budget, not both")
    if config.inner.mc_batch not in ("auto", "batched", "sequential"):
        raise ConfigError(f"inner.mc_batch must be auto, batched or sequential, got {config.inner.mc_batch!r}")
    if config.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {config.dtype!r}")
    if config.inner.lr <= 0 or config.train.meta_lr <= 0:
        raise ConfigError("inner.lr and train.meta_lr must be positive")
    if config.train.clip is not None and config.train.clip <= 0:
        raise ConfigError(f"train.clip must be positive or null (no clipping), got {config.train.clip}")
