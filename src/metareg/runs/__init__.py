"""The application: runs as users start them, on top of the library packages.

One module per kind of run, behind one table (:data:`KINDS`):

=============  ===========================  ============================  ==========================
kind           command                      config schema                 module
=============  ===========================  ============================  ==========================
``bilevel``    ``metareg train``            :class:`~metareg.config.Config`            :mod:`.episodic`
``meta-train`` ``metareg perturb meta-train``  :class:`~metareg.config.MetaTrainConfig`  :mod:`.metaperturb`
``transfer``   ``metareg perturb transfer``    :class:`~metareg.config.TransferConfig`   :mod:`.transfer`
=============  ===========================  ============================  ==========================

:mod:`.common` holds what they share (config resolution with presets, resuming); building from a
config is the library's (:mod:`metareg.build`); :mod:`.presets`, :mod:`.reproduce`, :mod:`.costs`,
:mod:`.bench`, :mod:`.task_view` and :mod:`.surface` are the named experiments, paper grids, their
measured costs, speed measurements, the episode views and the loss surfaces the plots draw. Library
packages never import this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..build import build_joint_learner, build_learner, build_transfer_network
from ..config import Config, MetaTrainConfig, TransferConfig
from ..meta.joint_trainer import JointTrainer
from ..meta.ordinary import TransferTrainer
from ..meta.trainer import MetaTrainer
from . import episodic, metaperturb, transfer


@dataclass(frozen=True)
class RunKind:
    """A kind of run, in one row: its config ``schema`` (which names its command), the library
    function that ``build``s its model from a config, its ``trainer`` class, the function that
    ``test``s a trained model, the function that ``run``s it (``run(config, out, resume=...,
    progress=..., deadline=...)``), the command-line flags that set config keys (flag -> dotted key),
    those a resumed run may still change, and its built-in default preset."""

    schema: type[Config] | type[MetaTrainConfig] | type[TransferConfig]
    build: Callable[..., Any]
    trainer: type
    test: Callable[..., Any] | None
    run: Callable[..., Any]
    flags: dict[str, str] = field(default_factory=dict)
    resume_flags: dict[str, str] = field(default_factory=dict)
    default_preset: str | None = None

    @property
    def name(self) -> str:
        return self.schema.kind

    @property
    def command(self) -> str:
        return self.schema.command


_COMMON = {"data_root": "data.root", "seed": "seed", "device": "device"}
_IMAGES = _COMMON | {
    "data": "data.name",
    "arch": "model.backbone",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
}

KINDS: dict[str, RunKind] = {
    kind.name: kind
    for kind in (
        RunKind(
            Config,
            build_learner,
            MetaTrainer,
            episodic.meta_test,
            episodic.train,
            _COMMON | {"steps": "train.steps", "episodes": "eval.episodes", "mc_samples": "inner.eval_mc_samples"},
            {"steps": "train.steps", "episodes": "eval.episodes", "device": "device", "data_root": "data.root"},
            "quickstart",
        ),
        RunKind(
            MetaTrainConfig,
            build_joint_learner,
            JointTrainer,
            None,  # a meta-trained phi is tested by transferring it
            metaperturb.meta_train,
            _IMAGES | {"tasks": "tasks", "perturbation": "perturb.name"},
            {"steps": "train.steps", "device": "device", "data_root": "data.root"},
            "perturb-quickstart",
        ),
        RunKind(
            TransferConfig,
            build_transfer_network,
            TransferTrainer,
            transfer.final_test,
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
            {"steps": "train.steps", "device": "device", "data_root": "data.root"},
            "transfer-quickstart",
        ),
    )
}

__all__ = ["KINDS", "RunKind"]
