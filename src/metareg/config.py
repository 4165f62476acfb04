"""Dataclass configs, loading from YAML/JSON with overrides, and the named presets.

A config is five sections (``data``, ``model``, ``inner``, ``train``, ``eval``) plus run-wide
fields. Unknown keys are errors, never silently ignored: a typo must not run the wrong experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


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
    strategy: str = "auto"  # loop | vmap | auto (loop on CPU, vmap on CUDA)


@dataclass
class EvalConfig:
    episodes: int = 1000
    seed: int = 1234  # fixes the test episode stream: every model sees the same episodes
    tasks_per_batch: int = 4


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        return _build(cls, values, "")


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
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("options", "perturbation_options"):
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
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
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
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return values


def resolve(preset: str | None = None, file: str | Path | None = None, overrides: list[dict[str, Any]] | None = None) -> Config:
    """Defaults <- preset <- config file <- overrides, validated."""
    from .presets import get_preset

    values: dict[str, Any] = Config().to_dict()
    if preset:
        values = merge(values, get_preset(preset).values)
        values["preset"] = preset
    if file:
        values = merge(values, load_file(file))
    for override in overrides or []:
        values = merge(values, override)
    config = Config.from_dict(values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that span fields (single fields are type-checked while building)."""
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
    if config.train.strategy not in ("auto", "loop", "vmap"):
        raise ConfigError(f"train.strategy must be auto, loop or vmap, got {config.train.strategy!r}")
    if config.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {config.dtype!r}")
    if config.inner.lr <= 0 or config.train.meta_lr <= 0:
        raise ConfigError("inner.lr and train.meta_lr must be positive")
