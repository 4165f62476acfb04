"""The application: runs as users start them, on top of the library packages.

One module per kind of run, behind one table (:data:`KINDS`):

=============  ===========================  ============================  ==========================
kind           command                      config schema                 module
=============  ===========================  ============================  ==========================
``bilevel``    ``metareg train``            :class:`~metareg.config.Config`            :mod:`.episodic`
``meta-train`` ``metareg perturb meta-train``  :class:`~metareg.config.MetaTrainConfig`  :mod:`.metaperturb`
``transfer``   ``metareg perturb transfer``    :class:`~metareg.config.TransferConfig`   :mod:`.transfer`
=============  ===========================  ============================  ==========================

:mod:`.common` holds what they share (config resolution with presets, device, dtype, strategy, run
folders, reading a stored run, resuming); :mod:`.presets`, :mod:`.reproduce`, :mod:`.costs`,
:mod:`.bench`, :mod:`.task_view` and :mod:`.surface` are the named experiments, paper grids, their
measured costs, speed measurements, the episode views and the loss surfaces the plots draw. Library
packages never import this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, MetaTrainConfig, TransferConfig
from . import episodic, metaperturb, transfer


@dataclass(frozen=True)
class RunKind:
    """A kind of run: its config schema, the command that starts it, the function that runs it
    (``run(config, out, resume=..., progress=...)``), the command-line flags that set config keys
    (flag -> dotted key), those a resumed run may still change, and its built-in default preset."""

    name: str
    schema: type
    command: str
    run: Callable[..., Any]
    flags: dict[str, str] = field(default_factory=dict)
    resume_flags: dict[str, str] = field(default_factory=dict)
    default_preset: str | None = None


_COMMON = {"data_root": "data.root", "seed": "seed", "device": "device"}
_IMAGES = _COMMON | {
    "data": "data.name",
    "arch": "model.backbone",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
}

KINDS: dict[str, RunKind] = {
    "bilevel": RunKind(
        "bilevel",
        Config,
        "metareg train",
        episodic.train,
        _COMMON | {"steps": "train.steps", "episodes": "eval.episodes", "mc_samples": "inner.eval_mc_samples"},
        {"steps": "train.steps", "episodes": "eval.episodes", "device": "device"},
        "quickstart",
    ),
    "meta-train": RunKind(
        "meta-train",
        MetaTrainConfig,
        "metareg perturb meta-train",
        metaperturb.meta_train,
        _IMAGES | {"tasks": "tasks", "perturbation": "perturb.name"},
        {"steps": "train.steps", "device": "device"},
        "perturb-quickstart",
    ),
    "transfer": RunKind(
        "transfer",
        TransferConfig,
        "metareg perturb transfer",
        transfer.transfer,
        _IMAGES
        | {
            "perturbation": "perturb.name",
            "phi": "perturb.phi",
            "init_from": "init_from",
            "mc_samples": "perturb.mc_samples",
            "select": "select",
            "against_base": "against_base",
        },
        {"steps": "train.steps", "device": "device"},
        "transfer-quickstart",
    ),
}

__all__ = ["KINDS", "RunKind"]
