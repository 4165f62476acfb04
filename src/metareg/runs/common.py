"""What every kind of run shares on the command line: its config (defaults <- preset <- file <-
overrides, names checked against the registries), the command that started it, and the one way a
run is resumed. (Building objects from a config is :mod:`metareg.build`; a run folder's stored
config is :mod:`metareg.runfolder`.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .. import preflight
from ..config import SCHEMAS, Config, MetaTrainConfig, TransferConfig, load_file, merge, upgrade, validate
from ..data import get_episodic, labeled_datasets
from ..errors import ConfigError
from ..nets import get_backbone
from ..perturb import available as perturbations
from ..runfolder import config_of_run
from .presets import get_preset


def command_line() -> str:
    """How this process was started, as a metareg command (recorded in checkpoints and provenance)."""
    return " ".join(["metareg", *sys.argv[1:]]) if sys.argv else ""


# ------------------------------------------------------------------------------------- config
def resolve(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[dict[str, Any]] | None = None,
    schema: type[Config | MetaTrainConfig | TransferConfig] = Config,
) -> Any:
    """Defaults <- preset <- config file <- overrides, validated; ``schema`` is the kind of run
    (:class:`Config`, :class:`MetaTrainConfig` or :class:`TransferConfig`)."""
    kind = schema.kind
    values: dict[str, Any] = schema().to_dict()
    if preset:
        found = get_preset(preset)
        if found.kind != kind:
            raise ConfigError(
                f"preset {preset!r} is a {found.kind} preset: run it with `{SCHEMAS[found.kind].command}`"
            )
        values = merge(values, upgrade(found.values, kind))
        values["preset"] = preset
    if file:
        values = merge(values, upgrade(load_file(file), kind))
    for override in overrides or []:  # each piece is read under today's names before it is merged
        values = merge(values, upgrade(override, kind))
    config = schema.from_dict(values)
    if config.data.root is not None:  # stored resolved: the run can be tested from any folder
        config.data.root = str(Path(config.data.root).expanduser().resolve())
    check(config)
    return config


def check(config: Any) -> None:
    """Validate ``config``: its own ranges, its names against the registries (data set, backbone,
    perturbation), so a typo fails before anything runs, and what it would build and the memory
    that needs (:mod:`metareg.preflight`)."""
    validate(config)
    get_backbone(config.model.backbone)
    if isinstance(config, Config):
        dataset = get_episodic(config.data.name)
        if config.data.test_name:
            other = get_episodic(config.data.test_name)
            if (other.channels, other.regression) != (dataset.channels, dataset.regression):
                raise ConfigError(
                    f"data.test_name {config.data.test_name!r} has other inputs than {config.data.name!r} "
                    f"({other.channels} vs {dataset.channels} channels): the network cannot be tested on it"
                )
    elif config.data.name not in labeled_datasets():
        raise ConfigError(f"unknown data set {config.data.name!r}; available: {', '.join(labeled_datasets())}")
    name = config.perturb.name
    if name not in perturbations():
        raise ConfigError(f"unknown perturbation {name!r}; available: {', '.join(perturbations())}")
    preflight.check(config)


def resumed(out: str | Path, kind: str, changes: dict[str, Any]) -> Any:
    """The config to continue run ``out`` with: the stored one, with ``changes`` (dotted keys such
    as ``train.steps``, ``device``, ``data.root``: the only things a resumed run may change; the
    data may have moved, the experiment may not) applied and validated again."""
    config = config_of_run(out, kind)
    for key, value in changes.items():
        if value is None:
            continue
        *sections, field = key.split(".")
        target = config
        for section in sections:
            target = getattr(target, section)
        setattr(target, field, value)
    if changes.get("data.root") is not None:
        config.data.root = str(Path(config.data.root).expanduser().resolve())
    check(config)
    return config
