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

Unknown keys are errors, never silently ignored: a typo must not run the wrong experiment. Every
number has a meaning and its range (:data:`RANGES`: seeds, counts, rates), a section can only be
given as a mapping of its keys (``train=5`` or ``train=null`` is refused, never read as "the
defaults"), and values nest at most :data:`MAX_DEPTH` levels.
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
    wants a dot in a float (``1.0e-5``), so ``beta: 1e-5`` would silently become a string; and
    reads ``2001-01-01`` as the text it is, not as a date (a config holds JSON's values only)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
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
    strategy: str = "auto"  # loop | vmap | parallel (CPU processes) | auto (see build.resolve_strategy)
    # On CUDA, capture the whole meta-training step as a graph (eager where impossible). Off until the
    # CUDA tier (tests/test_cuda.py) has passed on a GPU: see benchmarks/gpu_run.sh.
    cuda_graph: bool = False
    workers: int | None = None  # processes of the parallel strategy (default: the CPU cores available)
    recompute: bool = False  # rebuild each second-order inner step's graph in the meta-backward instead of storing it
    precision: str = "float32"  # float32 | bf16 (autocast for the inner and outer passes, float32 master weights)
    task_chunk: int | None = None  # vmap: tasks per chunk of the meta-batch (default: all at once)
    memory_budget: float | None = None  # vmap: MiB a chunk of tasks may take (the chunk size is derived from it)
    epoch_steps: int = 500  # iterations per epoch (MAML++'s total_iter_per_epoch) for the epoch schedules
    lr_schedule: str = "constant"  # constant | cosine (MAML++: annealed per epoch to min_lr)
    min_lr: float = 1e-5  # the cosine schedule's floor (MAML++'s min_learning_rate)


@dataclass
class EvalConfig:
    episodes: int = 1000
    seed: int = 1234  # fixes the test episode stream: every model sees the same episodes
    tasks_per_batch: int = 4


@dataclass
class _RunConfig:
    """A whole run's config: to and from plain dicts (unknown keys are errors; keys of earlier
    versions are read under their new names, see :data:`RENAMED`)."""

    kind: ClassVar[str]  # the kind of run (``bilevel``, ``meta-train``, ``transfer``)
    command: ClassVar[str]  # the command that runs it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        return _build(cls, upgrade(check_depth(values, "the config"), cls.kind), "")


@dataclass
class Config(_RunConfig):
    """The config of a meta-learning run (``metareg train``): what ``config.json`` of a run folder
    holds, what presets, ``--config`` files and ``--set KEY=VALUE`` fill in. Every field has a
    default; ``Config.from_dict`` reads a nested dict (unknown keys are errors, with a suggestion
    for typos; keys of earlier versions are read under their new names with a one-line notice).

    Args:
        data: the data set and the episodes: ``name`` (``glyphs``, ``omniglot``,
            ``miniimagenet``, ``sine``, ``polynomial``), ``root``, ``way``, ``shot``, ``query``,
            ``eval_shot``, ``image_size``, ``options``, the splits.
        model: the network: ``backbone`` (:func:`metareg.list_models`) and its ``options``.
        perturb: the feature perturbation in every slot: ``name``
            (:func:`metareg.list_perturbations`) and its ``options``.
        inner: the inner loop: ``step`` (``sgd``, ``meta-sgd``, ``per-step``), ``lr``, ``steps``,
            ``eval_steps``, ``first_order``, ``fast``, ``transforms``, ``mc_samples``,
            ``eval_mc_samples``, ``mc_batch``.
        train: the outer loop: ``steps``, ``meta_batch``, ``lr``, ``clip``, ``val_every``,
            ``val_episodes``, ``log_every``, ``checkpoint_every``, ``strategy``, ``cuda_graph``.
        eval: the meta-test: ``episodes`` (1000), ``seed`` (fixes the episodes), ``tasks_per_batch``.
        seed: the training seed.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: ``float32`` or ``float64``.
        preset: the preset it started from, if any.

    Examples:
        ```python
        import metareg

        config = metareg.Config.from_dict({"data": {"name": "glyphs", "way": 5, "shot": 1},
                                           "inner": {"lr": 0.4, "steps": 5}, "train": {"steps": 600}})
        print(config.data.way, config.inner.steps, config.train.lr)
        ```
    """

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
    out, renamed = moved_keys(values, kind)
    for old, new in renamed:
        if old not in _noticed:
            _noticed.add(old)
            print(f"metareg: note: config key {old!r} is now {new!r} (read as such)", file=sys.stderr)
    return out


def moved_keys(values: Any, kind: str) -> tuple[Any, list[tuple[str, str]]]:
    """``values`` with the keys of earlier versions moved to their new names, and the (old, new)
    pairs it moved, silently (``upgrade`` announces them)."""
    renamed: list[tuple[str, str]] = []
    if not isinstance(values, dict):
        return values, renamed
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for old, new in RENAMED.get(kind, {}).items():
        *old_sections, old_key = old.split(".")
        holder: dict[str, Any] | None  # the section that holds old_key, None if there is none
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
        renamed.append((old, new))
    return out, renamed


# --------------------------------------------------------------------------------------- building
def coerce(value: Any, hint: Any) -> Any:
    """Check (and gently coerce: int -> float) ``value`` against a type hint; raise TypeError. Hints
    it does not know (a callable, a class of the caller's) accept anything."""
    return _type_ok(value, hint)


def _type_ok(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value in typing.get_args(hint) and type(value) in {type(a) for a in typing.get_args(hint)}:
            return value
        raise TypeError
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
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        items = typing.get_args(hint)
        if origin is tuple and (len(items) != 2 or items[1] is not Ellipsis):
            return list(value)
        return [_type_ok(v, items[0]) for v in value] if items else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return dict(value)
    if hint is Any or not isinstance(hint, type):
        return value
    if hint in (list, tuple):  # YAML and JSON have lists only
        if not isinstance(value, (list, tuple)):
            raise TypeError
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
        if not isinstance(key, str):
            raise ConfigError(f"config keys are names, got {key!r} in section {where[:-1] or 'top level'!r}")
        path = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{path}.")
            continue
        try:
            kwargs[key] = _type_ok(value, hint)
        except TypeError:
            raise ConfigError(f"config key {path!r} must be {_hint_name(hint)}, got {value!r}") from None
    return cls(**kwargs)


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into ``base`` (dataclass sections merge key by key). A mapping in
    ``base`` (a section, or options) is never replaced by something that is not a mapping:
    ``train=5`` or ``train=null`` would otherwise reset the whole section to its defaults."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(out.get(key), dict) and not isinstance(value, dict):
            raise ConfigError(
                f"config section {where + str(key)!r} must be a mapping of its keys, got {value!r} (set one key, "
                f"e.g. {where + str(key)}.KEY=VALUE)"
            )
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and key not in ("options", "perturbation_options")
        ):
            out[key] = merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


#: How deep config values may nest (sections, options and their lists and mappings).
MAX_DEPTH = 32


def check_depth(values: Any, what: str) -> Any:
    """``values`` if it nests at most :data:`MAX_DEPTH` levels, else a one-line ConfigError (walked
    without recursion, so a value nested thousands of levels deep is refused, not a RecursionError)."""
    stack = [(values, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{what} nests deeper than {MAX_DEPTH} levels (a config is sections of plain values)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
    return values


def parse_assignment(text: str) -> dict[str, Any]:
    """``"train.iterations=100"`` -> ``{"train": {"iterations": 100}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(key.strip() for key in keys):
        raise ConfigError(f"override {text!r} must look like section.key=value (a key is empty)")
    try:
        value = load_yaml(raw)
    except (yaml.YAMLError, ValueError, OverflowError, TypeError):  # (a date YAML cannot build, say)
        value = raw
    except RecursionError:
        raise ConfigError(f"override {text[:60]!r}... nests deeper than {MAX_DEPTH} levels") from None
    check_depth(value, f"override {path.strip()!r}")
    out: dict[str, Any] = {}
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {kind}: {str(err).splitlines()[0]}") from None
    except (ValueError, OverflowError, TypeError) as err:  # a value YAML cannot build (a date that does not exist)
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests deeper than {MAX_DEPTH} levels") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return check_depth(values, f"config file {path}")


# ---------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Range:
    """The values a config number may take: ``low`` .. ``high`` (None: unbounded), each end
    included unless ``open`` says otherwise; ``whole``: an integer."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    whole: bool = False

    def holds(self, value: float) -> bool:
        if self.whole and (isinstance(value, float) and not value.is_integer()):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            if self.whole:
                return f"a whole number in {self.low:g}..{self.high}"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"{'<' if self.open_high else '<='} {self.high:g}"


SEED = Range(0, 2**63 - 1, whole=True)  # what torch.manual_seed takes (a 64-bit seed)
COUNT = Range(1)  # a number of things (>= 1)
STEPS = Range(0)  # a number of steps (0: nothing to do)
RATE = Range(0, open_low=True)  # a learning rate, a clipping threshold (> 0)
FRACTION = Range(0, 1, open_low=True, open_high=True)
#: Integers beyond this cannot be a count, a step or a seed (torch stores them in 64 bits).
LARGEST_INT = 2**63 - 1

#: What every number of a config means: its dotted key (in any kind of run that has it) -> its range.
#: ``null`` (where the type allows it) means "the default" and is not checked.
RANGES: dict[str, Range] = {
    "seed": SEED,
    "eval.seed": SEED,
    "data.seed": SEED,
    # episodic tasks
    "data.way": COUNT,
    "data.shot": COUNT,
    "data.query": COUNT,
    "data.eval_shot": COUNT,
    "data.image_size": COUNT,
    "inner.lr": RATE,
    "inner.steps": COUNT,
    "inner.eval_steps": COUNT,
    "inner.mc_samples": COUNT,
    "inner.eval_mc_samples": COUNT,
    "inner.multi_step_epochs": STEPS,
    "inner.multi_step_min": Range(0, 1),
    "inner.first_order_epochs": STEPS,
    "train.steps": STEPS,
    "train.meta_batch": COUNT,
    "train.lr": RATE,
    "train.clip": RATE,
    "train.val_every": COUNT,
    "train.val_episodes": COUNT,
    "train.log_every": COUNT,
    "train.checkpoint_every": COUNT,
    "train.epoch_steps": COUNT,
    "train.min_lr": RATE,
    "train.workers": COUNT,
    "train.task_chunk": COUNT,
    "train.memory_budget": RATE,  # MiB
    "eval.episodes": COUNT,
    "eval.tasks_per_batch": COUNT,
    # ordinary training (MetaPerturb's runs)
    "data.classes": COUNT,
    "data.train_per_class": COUNT,
    "data.test_per_class": COUNT,
    "train.batch_size": COUNT,
    "train.weight_decay": Range(0),
    "train.gamma": Range(0, 1, open_low=True),
    "perturb.clip": RATE,
    "perturb.anneal": Range(0, 1),
    "perturb.mc_samples": COUNT,
    "tasks": COUNT,
    "train_fraction": FRACTION,
    "eval_every": COUNT,
    "eval_mc_samples": COUNT,
}


def _check_finite(values: Any, where: str = "") -> None:
    """Every value in a config (options included) is plain (JSON: the config is stored with the run)
    and every number finite: ``nan <= 0`` is False, so a NaN would slip through every range check
    after this one."""
    stack = [(values, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{at}{k}.") for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{at}{i}.") for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {at[:-1]!r} must be a finite number, got {value}")
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(
                f"config key {at[:-1]!r} holds a {type(value).__name__} ({value!r}), not a plain number, word or list"
            )
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INT:
            raise ConfigError(f"config key {at[:-1]!r} is {value}, beyond any count, step or seed (2**63 - 1)")


def numbers(config: Any, where: str = "") -> dict[str, float]:
    """Every number of a config (``int`` or ``float`` fields, not options), by dotted key."""
    out: dict[str, float] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out |= numbers(value, f"{where}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{where}{f.name}"] = value
    return out


def _check_ranges(config: Any) -> None:
    for key, value in numbers(config).items():
        allowed = RANGES.get(key)
        if allowed is not None and not allowed.holds(value):
            raise ConfigError(f"{key} must be {allowed.describe()}, got {value}")


def _validate_engine(config: Config) -> None:
    """How the bilevel engine runs: strategy, precision, memory, schedules."""
    t = config.train
    if t.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine, got {t.lr_schedule!r}")
    if t.lr_schedule == "cosine" and t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr must be in (0, train.lr] for the cosine schedule, got {t.min_lr}")
    if t.strategy not in ("auto", "loop", "vmap", "parallel"):
        raise ConfigError(f"train.strategy must be auto, loop, vmap or parallel, got {t.strategy!r}")
    if t.precision not in ("float32", "bf16"):
        raise ConfigError(f"train.precision must be float32 or bf16, got {t.precision!r}")
    if t.precision == "bf16" and config.dtype != "float32":
        raise ConfigError("train.precision=bf16 keeps float32 master weights: set dtype to float32")
    if t.task_chunk is not None and t.memory_budget is not None:
        raise ConfigError("give train.task_chunk or train.memory_budget, not both")


def _validate_ordinary(config: MetaTrainConfig | TransferConfig) -> None:
    """Checks shared by the MetaPerturb runs."""
    o = config.train
    if any(not 0 < m < 1 for m in o.milestones) or sorted(o.milestones) != list(o.milestones):
        raise ConfigError(f"train.milestones must be increasing fractions of the steps in (0, 1), got {o.milestones}")


def validate(config: Any) -> None:
    """Check ``config``: every number finite and within its range (:data:`RANGES`), and the checks
    that span fields (single fields are type-checked while building)."""
    _check_finite(config.to_dict())
    _check_ranges(config)
    if config.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {config.dtype!r}")
    if isinstance(config, (MetaTrainConfig, TransferConfig)):
        _validate_ordinary(config)
    if isinstance(config, MetaTrainConfig):
        if config.train.strategy not in ("auto", "loop", "vmap"):
            raise ConfigError(f"train.strategy must be auto, loop or vmap, got {config.train.strategy!r}")
        if config.task_split not in ("classes", "instances"):
            raise ConfigError(f"task_split must be classes or instances, got {config.task_split!r}")
    if isinstance(config, Config):
        _validate_engine(config)
    d = config.data
    if isinstance(config, TransferConfig) and d.train_split == d.test_split and d.train_per_class is None:
        raise ConfigError(
            f"train and test images both come from split {d.train_split!r}: set data.train_per_class "
            "(images of each class for training; the rest are for testing)"
        )
    if isinstance(config, Config) and config.inner.mc_batch not in ("auto", "batched", "sequential"):
        raise ConfigError(f"inner.mc_batch must be auto, batched or sequential, got {config.inner.mc_batch!r}")
