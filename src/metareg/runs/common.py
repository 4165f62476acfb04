"""What every kind of run shares: its config (defaults <- preset <- file <- overrides, names checked
against the registries), device, dtype and execution strategy, its folder, reading a stored run's
config, and the one way a run is resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CHECKPOINT,
    check_run_folder,
    read_checkpoint_meta,
    write_json_atomic,
)
from ..config import Config, MetaTrainConfig, TransferConfig, load_file, merge, validate
from ..data import get_episodic, labeled_datasets
from ..errors import CheckpointError, ConfigError, MetaregError
from ..nets import create_model, get_backbone
from ..perturb import available as perturbations
from .presets import get_preset

IMAGE_CHANNELS = (
    3  # ordinary training takes RGB; grayscale data is repeated over 3 channels (as MetaPerturb's reference does)
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCHEMAS = {"bilevel": Config, "meta-train": MetaTrainConfig, "transfer": TransferConfig}
COMMANDS = {
    "bilevel": "metareg train",
    "meta-train": "metareg perturb meta-train",
    "transfer": "metareg perturb transfer",
}


def command_line() -> str:
    """How this process was started, as a metareg command (recorded in checkpoints and provenance)."""
    return " ".join(["metareg", *sys.argv[1:]]) if sys.argv else ""


def kind_of(config: Any) -> str:
    return next(kind for kind, schema in SCHEMAS.items() if isinstance(config, schema))


# ------------------------------------------------------------------------------------- config
def resolve(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[dict[str, Any]] | None = None,
    schema: type = Config,
) -> Any:
    """Defaults <- preset <- config file <- overrides, validated; ``schema`` is the kind of run
    (:class:`Config`, :class:`MetaTrainConfig` or :class:`TransferConfig`)."""
    kind = next(k for k, s in SCHEMAS.items() if s is schema)
    values: dict[str, Any] = schema().to_dict()
    if preset:
        found = get_preset(preset)
        if found.kind != kind:
            raise ConfigError(f"preset {preset!r} is a {found.kind} preset: run it with `{COMMANDS[found.kind]}`")
        values = merge(values, found.values)
        values["preset"] = preset
    if file:
        values = merge(values, load_file(file))
    for override in overrides or []:
        values = merge(values, override)
    config = schema.from_dict(values)
    if config.data.root is not None:  # stored resolved: the run can be tested from any folder
        config.data.root = str(Path(config.data.root).expanduser().resolve())
    check(config)
    return config


def check(config: Any) -> None:
    """Validate ``config``: its own ranges, and its names against the registries (data set,
    backbone, perturbation), so a typo fails before anything runs."""
    validate(config)
    get_backbone(config.model.backbone)
    if isinstance(config, Config):
        get_episodic(config.data.name)
    elif config.data.name not in labeled_datasets():
        raise ConfigError(f"unknown data set {config.data.name!r}; available: {', '.join(labeled_datasets())}")
    name = config.model.perturbation if isinstance(config, Config) else config.perturb.name
    if name not in perturbations():
        raise ConfigError(f"unknown perturbation {name!r}; available: {', '.join(perturbations())}")


# ------------------------------------------------------------------------------- devices etc.
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available to this torch")
    return device


def dtype_of(config: Any) -> torch.dtype:
    return DTYPES[config.dtype]


def resolve_strategy(
    strategy: str, device: torch.device, backbone: str, vmap_safe: bool = True, recompute: bool = False
) -> str:
    """``auto``: ``vmap`` on CUDA and for the small MLP regressors (1.5x the loop's tasks/s on the
    sine preset on CPU, where per-task Python overhead dominates); the per-task loop for conv nets
    on CPU (``metareg bench``: the loop is 1.5x faster than ``vmap`` there, with 1/5 the memory),
    and for perturbations ``vmap`` cannot batch (``vmap_safe = False``: mixup's permutations,
    inner-loop attacks), and for recomputed inner steps (``recompute``: one task's graph at a time)."""
    if strategy != "auto":
        return strategy
    return "vmap" if (device.type == "cuda" or backbone == "mlp") and vmap_safe and not recompute else "loop"


def resolve_mc_batch(choice: str, device: torch.device, model: torch.nn.Module) -> bool:  # noqa: ARG001
    """Whether the inner loop's Monte-Carlo samples run as one batched pass. ``auto``: batched
    whenever the model can stack copies (its batch norms are the episodic ones). Measured with
    ``metareg bench --mc 30`` on 2 CPU cores, Meta-Dropout's meta-test: 1.10-1.17x faster batched
    for 20-way Conv4-64, 2.1x for 5-way Conv4-32 (at twice the memory); on a GPU, where S small
    passes are bound by kernel launches, one large pass is expected to win by more (unmeasured)."""
    if choice == "auto":
        return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return choice == "batched"


def build_network(
    name: str, num_classes: int, image_size: int, options: dict[str, Any], perturbation: Any = None
) -> torch.nn.Module:
    """A backbone in its ordinary-training form (running batch-norm statistics, He init), RGB input."""
    extra = {} if perturbation is None else {"perturbation": perturbation}
    return create_model(
        name, num_classes, in_channels=IMAGE_CHANNELS, image_size=image_size, standard=True, **extra, **options
    )


# -------------------------------------------------------------------------------- run folders
def prepare_run_folder(out: Path, resume: bool, config: Any, main: bool = True, started: bool | None = None) -> None:
    """A new run needs a folder without a checkpoint (its resolved config goes to config.json);
    ``resume`` needs one with a checkpoint (or, with ``started``, whatever says the run began)."""
    if started is None:
        check_run_folder(out, resume, CHECKPOINT)
    elif started and not resume:
        raise ConfigError(
            f"run folder {out} already holds a started run: pass --resume to continue it, or choose another --out"
        )
    elif resume and not started:
        raise CheckpointError(f"nothing to resume: {out} holds no started run")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json_atomic(out / "config.json", {"kind": kind_of(config)} | config.to_dict())


def read_run(path: str | Path) -> tuple[str, Any]:
    """(kind, config) of a run folder or its checkpoint.json, from the checkpoint's record (or, for a
    run that has none yet, such as a transfer still choosing its hyperparameters, its config.json)."""
    folder = Path(path)
    if folder.is_dir() and not (folder / f"{CHECKPOINT}.json").exists() and (folder / "config.json").is_file():
        stored = read_record_json(folder / "config.json")
        kind = stored.pop("kind", "bilevel")
        try:
            return kind, SCHEMAS[kind].from_dict(stored)
        except (KeyError, TypeError, MetaregError) as err:
            raise CheckpointError(f"{folder / 'config.json'} holds no valid {kind} config ({err})") from None
    json_path, meta = read_checkpoint_meta(path, CHECKPOINT)
    kind = meta.get("kind", "bilevel")
    if kind not in SCHEMAS:
        raise CheckpointError(f"{json_path} is a run of unknown kind {kind!r}")
    try:
        return kind, SCHEMAS[kind].from_dict(meta["config"])
    except (KeyError, TypeError, MetaregError) as err:
        raise CheckpointError(f"{json_path} holds no valid {kind} config ({err})") from None


def read_record_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} is not a run's config")
    return values


def config_of_run(path: str | Path, kind: str) -> Any:
    """The stored config of a run that must be of ``kind``."""
    found, config = read_run(path)
    if found != kind:
        raise CheckpointError(f"{path} is a {found} run, not a {kind} run: run it with `{COMMANDS[found]}`")
    return config


def resumed(out: str | Path, kind: str, changes: dict[str, Any]) -> Any:
    """The config to continue run ``out`` with: the stored one, with ``changes`` (dotted keys such
    as ``train.iterations``, ``device``: the only things a resumed run may change) applied and
    validated again."""
    config = config_of_run(out, kind)
    for key, value in changes.items():
        if value is None:
            continue
        *sections, field = key.split(".")
        target = config
        for section in sections:
            target = getattr(target, section)
        setattr(target, field, value)
    validate(config)
    return config
