"""Named presets: each mirrors one experiment of the seeds and names the paper row it reproduces.

Values are partial configs merged over the defaults of ``metareg.config.Config``. Hyperparameters of
the classification presets are those of the Meta-Dropout reference README (which the paper's
Table 1 was produced with); the sine presets follow the MT-net thesis, Section 6.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    paper: str  # the row it reproduces, with the paper's number
    values: dict[str, Any]
    kind: str = "bilevel"  # bilevel (metareg train) | meta-train | transfer (metareg perturb ...)
    cost: str = ""  # what it takes on 2 CPU cores, where it is long
    timing: str = ""  # its entry in metareg.runs.costs.MEASURED (measured s/iteration), where it is long


# The network of the Meta-Dropout reference code, whose MAML rows are "MAML (our reproduction)":
# truncated-normal init, batch norm with a meta-learned shift and no scale, and only the conv and
# dense weights adapted in the inner loop (batch norm is meta-only).
_REFERENCE_NET = {"init": "truncated_normal", "norm_scale": False}
_REFERENCE_FAST = ["blocks.*.conv.*", "head.weight", "head.bias"]


def _omniglot(way: int, shot: int, lr: float, meta_lr: float) -> dict[str, Any]:
    return {
        "data": {
            "name": "omniglot",
            "way": way,
            "shot": shot,
            "query": 15,
            "options": {"class_split": "vinyals"},
            # The 4800 meta-train classes of the Vinyals split include its validation classes,
            # so a validation score would not be held out: none is computed.
            "train_split": "trainval",
            "val_split": None,
        },
        "model": {"backbone": "conv4", "options": {"channels": 64} | _REFERENCE_NET},
        "inner": {"step": "sgd", "lr": lr, "steps": 5, "fast": _REFERENCE_FAST},
        "train": {
            "steps": 60000,
            "meta_batch": 4,
            "lr": meta_lr,
            "clip": 3.0,
            "val_every": 2000,
            "checkpoint_every": 500,
        },
    }


def _miniimagenet(shot: int) -> dict[str, Any]:
    return {
        "data": {"name": "miniimagenet", "way": 5, "shot": shot, "query": 15},
        "model": {"backbone": "conv4", "options": {"channels": 32} | _REFERENCE_NET},
        "inner": {"step": "sgd", "lr": 0.01, "steps": 5, "fast": _REFERENCE_FAST},
        "train": {
            "steps": 60000,
            "meta_batch": 4,
            "lr": 1e-4,
            "clip": 3.0,
            "val_every": 2000,
            "checkpoint_every": 500,
        },
    }


def _sine(step: str) -> dict[str, Any]:
    # Thesis 6.1: 2 hidden cells of 40, Adam 1e-3, alpha 0.01, W ~ truncated normal (std 0.01).
    return {
        "data": {"name": "sine", "shot": 10, "query": 10},
        "model": {"backbone": "mlp", "options": {"hidden": [40, 40], "init": "truncated_normal"}},
        "inner": {"step": step, "lr": 0.01, "steps": 1},
        "train": {
            "steps": 60000,
            "meta_batch": 4,
            "lr": 1e-3,
            "clip": None,
            "val_every": 5000,
            "val_episodes": 500,
            "log_every": 100,
            "checkpoint_every": 5000,
        },
        "eval": {"tasks_per_batch": 100},
    }


def _with(values: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in values.items()}
    for section, extra in sections.items():
        out[section] = out.get(section, {}) | extra
    return out


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "quickstart",
            "MAML, Conv4-32, 5-way 1-shot on the built-in generated glyphs: a few minutes on 2 CPU cores",
            "none (built-in data; checks that everything runs)",
            {
                "data": {"name": "glyphs", "way": 5, "shot": 1, "query": 15},
                "model": {"backbone": "conv4", "options": {"channels": 32}},
                "inner": {"step": "sgd", "lr": 0.4, "steps": 3, "eval_steps": 5},
                "train": {
                    "steps": 600,
                    "meta_batch": 4,
                    "lr": 1e-3,
                    "val_every": 200,
                    "val_episodes": 100,
                    "checkpoint_every": 100,
                },
                "eval": {"episodes": 1000},
            },
        ),
        Preset(
            "omniglot-20w1s",
            "MAML, Conv4-64, Omniglot 20-way 1-shot (Vinyals split)",
            "Meta-Dropout Table 1, MAML, Omniglot 20-way 1-shot: 95.23 +- 0.17",
            _omniglot(20, 1, 0.1, 3e-4),
        ),
        Preset(
            "omniglot-20w5s",
            "MAML, Conv4-64, Omniglot 20-way 5-shot (Vinyals split)",
            "Meta-Dropout Table 1, MAML, Omniglot 20-way 5-shot: 98.38 +- 0.07",
            _omniglot(20, 5, 0.4, 1e-3),
        ),
        Preset(
            "miniimagenet-5w1s",
            "MAML, Conv4-32, miniImageNet 5-way 1-shot",
            "Meta-Dropout Table 1, MAML, miniImageNet 5-way 1-shot: 49.58 +- 0.65",
            _miniimagenet(1),
        ),
        Preset(
            "miniimagenet-5w5s",
            "MAML, Conv4-32, miniImageNet 5-way 5-shot",
            "Meta-Dropout Table 1, MAML, miniImageNet 5-way 5-shot: 64.55 +- 0.52",
            _miniimagenet(5),
        ),
        Preset(
            "sine-10shot",
            "MAML, 1-40-40-1 MLP, sine regression 10-shot, one inner step, alpha 0.01",
            "MT-net thesis Table 6.1, MAML, 10-shot: MSE 0.71 +- 0.07",
            _sine("sgd"),
        ),
    ]
}
PRESETS |= {
    f"{name}-metasgd": Preset(
        f"{name}-metasgd",
        p.description.replace("MAML", "Meta-SGD", 1),
        {
            "omniglot-20w1s": "Meta-Dropout Table 1, Meta-SGD, Omniglot 20-way 1-shot: 96.16 +- 0.14",
            "omniglot-20w5s": "Meta-Dropout Table 1, Meta-SGD, Omniglot 20-way 5-shot: 98.54 +- 0.07",
            "miniimagenet-5w1s": "Meta-Dropout Table 1, Meta-SGD, miniImageNet 5-way 1-shot: 48.30 +- 0.64",
            "miniimagenet-5w5s": "Meta-Dropout Table 1, Meta-SGD, miniImageNet 5-way 5-shot: 65.55 +- 0.56",
            "sine-10shot": "MT-net thesis Table 6.1, Meta-SGD, 10-shot: MSE 0.53 +- 0.09",
        }[name],
        _with(p.values, inner={"step": "meta-sgd"}),
    )
    for name, p in list(PRESETS.items())
    if name != "quickstart"
}


# T-nets, M-nets and MT-nets on sine (thesis Table 6.1). T is meta-only: only W and b adapt.
_W_ONLY = {"fast": ["layers.*", "head.*"]}
_MT_VARIANTS = {
    "mnet-full": ("M-net-full", False, {"name": "subspace-mask", "per": "weight", "layers": ["*"]}, "0.63 +- 0.07"),
    "mnet": ("M-net", False, {"name": "subspace-mask", "per": "row"}, "0.60 +- 0.06"),
    "tnet": ("T-net", True, None, "0.56 +- 0.06"),
    "mtnet-full": ("MT-net-full", True, {"name": "subspace-mask", "per": "weight", "layers": ["*"]}, "0.51 +- 0.05"),
    "mtnet": ("MT-net", True, {"name": "subspace-mask", "per": "row"}, "0.49 +- 0.05"),
}
for _suffix, (_label, _transform, _mask, _paper) in _MT_VARIANTS.items():
    _values = _sine("sgd")
    _values["model"]["options"] |= {"transform": _transform}
    _values["inner"] |= (_W_ONLY if _transform else {}) | ({"transforms": [_mask]} if _mask else {})
    PRESETS[f"sine-10shot-{_suffix}"] = Preset(
        f"sine-10shot-{_suffix}",
        f"{_label}, 1-40-40-1 MLP, sine regression 10-shot, one inner step, alpha 0.01",
        f"MT-net thesis Table 6.1, {_label}, 10-shot: MSE {_paper}",
        _values,
    )


# Meta-Dropout (Table 1) and the noise ablations (Table 3) on the four classification presets: the
# same network and hyperparameters with a perturbation; S = 1 noise sample per inner step in
# meta-training and S = 30 in meta-testing (paper Section 3.1).
_BASES = {  # preset -> (its column in the tables, the column's name)
    "omniglot-20w1s": (0, "Omniglot 20-way 1-shot"),
    "omniglot-20w5s": (1, "Omniglot 20-way 5-shot"),
    "miniimagenet-5w1s": (2, "miniImageNet 5-way 1-shot"),
    "miniimagenet-5w5s": (3, "miniImageNet 5-way 5-shot"),
}
_TABLE_1 = {  # (suffix, label, perturbation, step, numbers for the four bases)
    "metadropout": (
        "MAML + Meta-dropout",
        "meta-dropout",
        "sgd",
        ("96.63 +- 0.13", "98.73 +- 0.06", "51.93 +- 0.67", "67.42 +- 0.52"),
    ),
    "metasgd-metadropout": (
        "Meta-SGD + Meta-dropout",
        "meta-dropout",
        "meta-sgd",
        ("97.02 +- 0.13", "99.05 +- 0.05", "50.87 +- 0.63", "65.55 +- 0.57"),
    ),
}
_TABLE_3 = {
    "fixed-gaussian": (
        "Fixed Gaussian",
        "fixed-gaussian",
        "sgd",
        ("95.44 +- 0.17", "98.99 +- 0.06", "49.39 +- 0.63", "66.84 +- 0.54"),
    ),
    "independent-gaussian": (
        "Independent Gaussian",
        "independent-gaussian",
        "sgd",
        ("94.36 +- 0.18", "98.26 +- 0.08", "50.31 +- 0.64", "66.97 +- 0.54"),
    ),
    "weight-gaussian": (
        "Weight Gaussian",
        "weight-gaussian",
        "sgd",
        ("94.32 +- 0.18", "98.35 +- 0.07", "49.37 +- 0.64", "64.78 +- 0.54"),
    ),
    "metadropout-deterministic": (
        "Deterministic Meta-dropout",
        "meta-dropout-deterministic",
        "sgd",
        ("95.99 +- 0.14", "97.78 +- 0.09", "50.75 +- 0.63", "65.62 +- 0.53"),
    ),
    "metadropout-learned-variance": (
        "Meta-dropout w/ learned variance",
        "meta-dropout-learned-variance",
        "sgd",
        ("95.98 +- 0.15", "98.87 +- 0.06", "50.93 +- 0.68", "66.15 +- 0.56"),
    ),
}
_numbers: tuple[str, ...]  # the tables below give 2, 3 or 4 numbers a row
for _table, _rows in (("Table 1", _TABLE_1), ("Table 3", _TABLE_3)):
    for _suffix, (_label, _perturbation, _step, _numbers) in _rows.items():
        for _base, (_column, _setting) in _BASES.items():
            _p = PRESETS[_base]
            _stochastic = _perturbation != "meta-dropout-deterministic"
            PRESETS[f"{_base}-{_suffix}"] = Preset(
                f"{_base}-{_suffix}",
                _p.description.replace("MAML", _label if _table == "Table 1" else f"MAML + {_label}", 1),
                f"Meta-Dropout {_table}, {_label}, {_setting}: {_numbers[_column]}",
                _with(
                    _p.values,
                    perturb={"name": _perturbation},
                    inner={"step": _step, "mc_samples": 1, "eval_mc_samples": 30 if _stochastic else 1},
                ),
            )


# Meta-Dropout Table 2: the regularizers it is compared against, in MAML's inner-gradient steps, their
# parameters meta-learned, S = 1 noise sample per step in meta-training and 30 at meta-test. The
# seed text's Table 2 lost its row labels in extraction for Information Dropout and Meta-dropout's
# beta rows: the numbers below follow the rows in the order the text gives them (its "0.1" row,
# 96.55 / 99.04 / 50.25 / 66.78, has no legible label and is not mapped).
_TABLE_2 = {  # suffix: (label, perturbation, options, numbers for the four bases)
    "manifold-mixup-g0.2": (
        "Input & Manifold Mixup, gamma = 0.2",
        "manifold-mixup",
        {"gamma": 0.2},
        ("89.78 +- 0.25", "97.86 +- 0.08", "48.62 +- 0.66", "63.86 +- 0.53"),
    ),
    "manifold-mixup-g1": (
        "Input & Manifold Mixup, gamma = 1",
        "manifold-mixup",
        {"gamma": 1.0},
        ("87.00 +- 0.28", "97.27 +- 0.10", "48.24 +- 0.62", "62.32 +- 0.54"),
    ),
    "manifold-mixup-g2": (
        "Input & Manifold Mixup, gamma = 2",
        "manifold-mixup",
        {"gamma": 2.0},
        ("87.26 +- 0.28", "97.14 +- 0.17", "48.42 +- 0.64", "62.56 +- 0.55"),
    ),
    "vib": (
        "Variational Information Bottleneck, beta = 1e-5",
        "vib",
        {"beta": 1e-5},
        ("92.09 +- 0.22", "98.85 +- 0.07", "48.12 +- 0.65", "64.78 +- 0.54"),
    ),
    "information-dropout-b1e-4": (
        "Information Dropout (ReLU), beta = 1e-4",
        "information-dropout",
        {"beta": 1e-4},
        ("93.01 +- 0.20", "98.80 +- 0.07", "46.75 +- 0.63", "64.07 +- 0.54"),
    ),
    "information-dropout-b1e-3": (
        "Information Dropout (ReLU), beta = 1e-3",
        "information-dropout",
        {"beta": 1e-3},
        ("94.98 +- 0.16", "98.75 +- 0.07", "47.59 +- 0.60", "63.30 +- 0.53"),
    ),
    "information-dropout-b1e-5": (
        "Information Dropout (ReLU), beta = 1e-5",
        "information-dropout",
        {"beta": 1e-5},
        ("94.49 +- 0.17", "98.50 +- 0.07", "50.36 +- 0.68", "65.91 +- 0.55"),
    ),
    "metadropout-kl1e-4": (
        "Meta-dropout, beta = 1e-4",
        "meta-dropout",
        {"kl": 1e-4},
        ("94.36 +- 0.17", "98.53 +- 0.07", "49.14 +- 0.63", "64.96 +- 0.54"),
    ),
    "metadropout-kl1e-3": (
        "Meta-dropout, beta = 1e-3",
        "meta-dropout",
        {"kl": 1e-3},
        ("94.28 +- 0.17", "98.65 +- 0.07", "43.78 +- 0.61", "63.36 +- 0.56"),
    ),
}
for _suffix, (_label, _perturbation, _options, _numbers) in _TABLE_2.items():
    for _base, (_column, _setting) in _BASES.items():
        _p = PRESETS[_base]
        PRESETS[f"{_base}-{_suffix}"] = Preset(
            f"{_base}-{_suffix}",
            _p.description.replace("MAML", f"MAML + {_label}", 1),
            f"Meta-Dropout Table 2, {_label}, {_setting}: {_numbers[_column]}",
            _with(
                _p.values,
                perturb={"name": _perturbation, "options": _options},
                inner={"mc_samples": 1, "eval_mc_samples": 30},
            ),
        )
# Figure 5's adversarial-training baselines: FGSM examples of size epsilon in the inner steps.
for _base, (_column, _setting) in _BASES.items():
    for _epsilon in (0.1, 0.3) if _base.startswith("omniglot") else (0.01, 0.1):
        _p = PRESETS[_base]
        PRESETS[f"{_base}-adversarial-e{_epsilon:g}"] = Preset(
            f"{_base}-adversarial-e{_epsilon:g}",
            _p.description.replace("MAML", f"MAML + inner-loop FGSM (epsilon {_epsilon:g})", 1),
            f"Meta-Dropout Figure 5, adversarial-learning baseline (epsilon {_epsilon:g}), {_setting}: "
            f"robustness curves only",
            _with(_p.values, perturb={"name": "adversarial", "options": {"epsilon": _epsilon}}),
        )


# Compositions the three axes allow (no paper row): MetaPerturb's 82-parameter phi in the slots of
# MAML's Conv4, meta-learned through the inner loop like Meta-Dropout's phi (sampled noise in the
# inner steps, a = mu on the query set, S = 30 at meta-test).
for _base, (_column, _setting) in _BASES.items():
    _p = PRESETS[_base]
    PRESETS[f"{_base}-metaperturb"] = Preset(
        f"{_base}-metaperturb",
        _p.description.replace("MAML", "MAML + MetaPerturb (phi learned through the inner loop)", 1),
        "none (a composition of the design's axes: MetaPerturb's phi in the bilevel scheme)",
        _with(
            _p.values,
            perturb={"name": "metaperturb", "options": {"phi": "learned"}},
            inner={"mc_samples": 1, "eval_mc_samples": 30},
        ),
    )


# MAML on ResNet-12 (MetaOptNet's backbone, the few-shot field's standard; episodic batch norm, no
# DropBlock in the inner loop: see metareg.nets.resnet12), with MAML's miniImageNet settings (Finn et
# al. 2017: alpha 0.01, 5 inner steps, 10 at meta-test, meta-batch 4 for 1-shot and 2 for 5-shot, Adam
# 1e-3, 60000 iterations, meta-gradients clipped to [-10, 10] as in their code). Second order with
# recomputed inner steps (train.recompute): the stored graphs of 5 steps need about 3x the memory.


def _miniimagenet_resnet12(shot: int) -> dict[str, Any]:
    return {
        "data": {"name": "miniimagenet", "way": 5, "shot": shot, "query": 15},
        "model": {"backbone": "resnet12"},
        "inner": {"step": "sgd", "lr": 0.01, "steps": 5, "eval_steps": 10},
        "train": {
            "steps": 60000,
            "meta_batch": 4 if shot == 1 else 2,
            "lr": 1e-3,
            "clip": 10.0,
            "val_every": 2000,
            "checkpoint_every": 500,
            "recompute": True,
        },
    }


for _shot in (1, 5):
    PRESETS[f"miniimagenet-5w{_shot}s-resnet12"] = Preset(
        f"miniimagenet-5w{_shot}s-resnet12",
        f"MAML, ResNet-12 (MetaOptNet), miniImageNet 5-way {_shot}-shot, second order with recomputed inner steps",
        "none: not a paper row of the seeds (MAML's miniImageNet settings of Finn et al. 2017 on ResNet-12, the "
        "backbone the few-shot field reports today; the seeds' MAML rows use Conv4)",
        _miniimagenet_resnet12(_shot),
        # 5-shot not timed yet: one 1-shot iteration took over 9 minutes on one thread, the
        # measurement of both did not fit the session (benchmarks/seed_costs.py resnet12-5w5s)
        timing="resnet12-5w1s" if _shot == 1 else "",
    )


# MetaPerturb (Ryu et al. 2020). Meta-training: the source split class-wise into 10 tasks, ResNet20,
# 32x32 images, Adam 1e-3 with weight decay 5e-4, batch 128, 750 steps (the released run script).
# Transfer: Adam 1e-3, weight decay 5e-4, batch 128, 10000 steps, lr x 0.3 at 40/70/90%, strength
# annealed over the first 40%, 100 MC samples at test time. The paper's source (Tiny ImageNet) and
# targets are not in this machine's data; the miniImageNet / Omniglot presets are our CPU-sized
# stand-ins (fewer steps, smaller batches), labelled as such.
def _meta_train(name: str, size: int = 32, steps: int = 750, batch: int = 128, **data: Any) -> dict[str, Any]:
    return {
        "data": {"name": name, "train_split": "train", "image_size": size} | data,
        "model": {"backbone": "resnet20"},
        "train": {"steps": steps, "batch_size": batch, "milestones": [], "log_every": 10, "checkpoint_every": 50},
        "tasks": 10,
    }


# Measured on 2 CPU cores: ResNet20, 64 images of 32x32 per step (forward and backward): 0.35 s bare,
# 0.70 s with MetaPerturb's frozen phi. Transfer costs scale with the images per step and their pixels.
_RESNET20_STEP = (0.35, 0.70)


def _cost(size: int, steps: int = 10000, batch: int = 128) -> str:
    scale = steps * batch / 64 * (size / 32) ** 2 / 3600
    base, perturbed = (t * scale for t in _RESNET20_STEP)
    return (
        f"~{base:.0f} h (Base) / ~{perturbed:.0f} h (MetaPerturb) on 2 CPU cores for {steps} steps of {batch} "
        f"images of "
        f"{size}x{size} (estimated from measured ResNet20 step times; the paper's schedule: run it on a GPU, in "
        f"--time-budget chunks)"
    )


def _transfer(
    name: str, size: int, steps: int = 10000, batch: int = 128, backbone: str = "resnet20", **data: Any
) -> dict[str, Any]:
    return {
        "data": {"name": name, "image_size": size} | data,
        "model": {"backbone": backbone},
        "train": {"steps": steps, "batch_size": batch, "log_every": 50, "checkpoint_every": 500},
    }


_TABLE1 = "MetaPerturb Table 1 (ResNet20, source TIN), Base / MetaPerturb / FT / FT + MetaPerturb"
_PERTURB_PRESETS = [
    Preset(
        "perturb-quickstart",
        "MetaPerturb meta-training on the built-in glyphs: 10 tasks of 5 classes, Conv4-32, 28x28, "
        "200 steps, a few minutes on 2 CPU cores",
        "none (built-in data; checks that everything runs)",
        _meta_train("glyphs", 28, 200, 32, classes=50, options={"num_classes": 50})
        | {"model": {"backbone": "conv4", "options": {"channels": 32}}},
        "meta-train",
    ),
    Preset(
        "perturb-quickstart-metadropout",
        "The joint scheme (MetaPerturb's Algorithm 1) learning Meta-Dropout's noise generators "
        "instead of MetaPerturb's phi: the built-in glyphs, 10 tasks of 5 classes, Conv4-32, 28x28, 200 steps",
        "none (a composition of the design's axes: Meta-Dropout's phi in the joint scheme)",
        _meta_train("glyphs", 28, 200, 32, classes=50, options={"num_classes": 50})
        | {"model": {"backbone": "conv4", "options": {"channels": 32}}, "perturb": {"name": "meta-dropout"}},
        "meta-train",
    ),
    Preset(
        "perturb-tinyimagenet-resnet20",
        "MetaPerturb meta-training as in the paper: Tiny ImageNet's 200 classes in 10 tasks, "
        "ResNet20, 32x32, batch 128, 750 steps",
        "MetaPerturb Section 4.1 source (the phi behind Tables 1-3)",
        _meta_train("tinyimagenet"),
        "meta-train",
        timing="metaperturb-meta-train-resnet20",
    ),
    Preset(
        "perturb-miniimagenet-resnet20",
        "MetaPerturb meta-training on miniImageNet's 64 meta-train classes (100 images each) "
        "in 10 tasks, ResNet20, 32x32, batch 32, 300 steps (CPU-sized stand-in for Tiny ImageNet)",
        "none directly (the paper's source is Tiny ImageNet); the shipped phi",
        _meta_train("miniimagenet", 32, 300, 32),
        "meta-train",
    ),
    Preset(
        "transfer-quickstart",
        "Train Conv4-32 on 20 glyph classes (10 images each, 10 more for testing) with the shipped phi, "
        "28x28, 300 steps",
        "none (built-in data)",
        _transfer(
            "glyphs",
            28,
            300,
            32,
            "conv4",
            train_split="test",
            test_split="test",
            classes=20,
            train_per_class=10,
            options={"num_classes": 20},
        )
        | {"model": {"backbone": "conv4", "options": {"channels": 32}}}
        | {"perturb": {"mc_samples": 10}, "against_base": True},
        "transfer",
    ),
    Preset(
        "transfer-miniimagenet",
        "ResNet20 on miniImageNet's 20 meta-test classes, 50 training and 50 test images per class, "
        "32x32, batch 64, 1000 steps (a data-scarce target, CPU-sized)",
        "none directly (our stand-in for the paper's targets)",
        _transfer("miniimagenet", 32, 1000, 64, train_split="test", test_split="test", train_per_class=50)
        | {"perturb": {"mc_samples": 30}},
        "transfer",
    ),
    Preset(
        "transfer-omniglot",
        "ResNet20 on 100 Omniglot characters of the Vinyals test split, 10 training and 10 test drawings "
        "each, 32x32, batch 64, 1000 steps (a target dissimilar to the source)",
        "none directly (a dissimilar domain)",
        _transfer("omniglot", 32, 1000, 64, train_split="test", test_split="test", classes=100, train_per_class=10)
        | {"perturb": {"mc_samples": 30}},
        "transfer",
    ),
    Preset(
        "source-miniimagenet",
        "ResNet20 trained without perturbation on miniImageNet's 64 meta-train classes (90 training, "
        "10 test images each), 32x32, batch 64, 2000 steps: the source network for fine-tuning baselines",
        "MetaPerturb's Finetuning baseline (source network; paper: Tiny ImageNet)",
        _transfer("miniimagenet", 32, 2000, 64, train_split="train", test_split="train", train_per_class=90)
        | {"perturb": {"name": "none"}},
        "transfer",
    ),
    Preset(
        "transfer-stl10",
        "ResNet20 on STL-10 (5000 training images), 32x32",
        f"{_TABLE1}, STL10: 66.78 / 69.98 / 77.16 / 78.27",
        _transfer("stl10", 32),
        "transfer",
        _cost(32),
        timing="metaperturb-transfer-resnet20-32",
    ),
    Preset(
        "transfer-scifar100",
        "ResNet20 on small CIFAR-100 (50 training images per class), 32x32",
        f"{_TABLE1}, s-CIFAR100: 31.79 / 34.57 / 43.69 / 47.41",
        _transfer("cifar100", 32, train_per_class=50),
        "transfer",
        _cost(32),
        timing="metaperturb-transfer-resnet20-32",
    ),
    Preset(
        "transfer-dogs",
        "ResNet20 on Stanford Dogs, 84x84",
        f"{_TABLE1}, Dogs: 34.65 / 38.41 / 40.09 / 46.06",
        _transfer("stanford-dogs", 84),
        "transfer",
        _cost(84),
        timing="metaperturb-transfer-resnet20-84",
    ),
    Preset(
        "transfer-cars",
        "ResNet20 on Stanford Cars, 84x84",
        f"{_TABLE1}, Cars: 44.34 / 62.46 / 58.61 / 73.04",
        _transfer("stanford-cars", 84),
        "transfer",
        _cost(84),
        timing="metaperturb-transfer-resnet20-84",
    ),
    Preset(
        "transfer-aircraft",
        "ResNet20 on FGVC-Aircraft (100 variants, trainval for training), 84x84",
        f"{_TABLE1}, Aircraft: 59.23 / 65.87 / 66.03 / 72.34",
        _transfer("aircraft", 84, train_split="trainval"),
        "transfer",
        _cost(84),
        timing="metaperturb-transfer-resnet20-84",
    ),
    Preset(
        "transfer-cub",
        "ResNet20 on CUB-200-2011, 84x84",
        f"{_TABLE1}, CUB: 30.63 / 42.01 / 34.89 / 48.60",
        _transfer("cub", 84),
        "transfer",
        _cost(84),
        timing="metaperturb-transfer-resnet20-84",
    ),
    Preset(
        "transfer-ssvhn",
        "small SVHN (500 training images per class), 32x32; choose the backbone with --arch",
        "MetaPerturb Table 2 (source ResNet20 on TIN), Base / MetaPerturb: Conv4 83.93 / 86.61, Conv6 86.14 / 88.59, "
        "VGG9 88.44 / 90.24, ResNet20 87.96 / 90.70, ResNet44 88.94 / 90.97, WRN-28-2 88.95 / 90.88",
        _transfer("svhn", 32, train_per_class=500),
        "transfer",
        _cost(32),
        timing="metaperturb-transfer-resnet20-32",
    ),
]
PRESETS |= {p.name: p for p in _PERTURB_PRESETS}


# ------------------------------------------------------------------------------------- MAML++
# Antoniou et al. (2019), from the released code's newest experiment configs (experiment_config/
# omniglot_maml++-omniglot_1_8_0.1_64_20_0.json, mini-imagenet_maml++_mini-imagenet_5_way_{1,5}_shot_0.json):
# 100 epochs of 500 iterations, Adam 1e-3 with cosine annealing (to 1e-5 on Omniglot; the
# miniImageNet configs set min_learning_rate = meta_learning_rate = 1e-3, so it stays constant),
# LSLR from 0.1 / 0.01, 5 inner steps, the multi-step loss over the first 10 / 15 epochs (floor 0.03,
# the code's constant), second order from the start / after epoch 10, per-step batch-norm weights,
# biases and statistics (BN not adapted in the inner loop), Conv4 with 64 / 48 filters, max-pooling,
# leaky ReLU, Glorot-uniform weights; meta-batch 8 (Omniglot 20-way), 4 (1-shot), 2 (5-shot);
# gradients clipped to +-10 on miniImageNet only; 1 query image per class on Omniglot, 15 on miniImageNet.
# Deviations: our Omniglot split is Vinyals' (1200 train characters, rotations as classes; the code
# splits 1150/50/423 characters and rotates as augmentation), no validation-based ensemble of the best
# 5 checkpoints (the code tests the top-5 validation epochs as an ensemble), 1000 test episodes (600).
_MAMLPP_NET = {"init": "xavier", "activation": "leaky_relu", "per_step_weights": True, "per_step_stats": True}
_CONV_FAST = ["blocks.*.conv.*", "head.weight", "head.bias"]


def _mamlpp(data: dict[str, Any], channels: int, lr: float, msl: int, first_order: int, batch: int) -> dict[str, Any]:
    imagenet = data["name"] == "miniimagenet"
    return {
        "data": data,
        "model": {"backbone": "conv4", "options": {"channels": channels} | _MAMLPP_NET},
        "inner": {
            "step": "per-step",
            "lr": lr,
            "steps": 5,
            "fast": _CONV_FAST,
            "multi_step_epochs": msl,
            "multi_step_min": 0.03,
            "first_order_epochs": first_order,
        },
        "train": {
            "steps": 100 * 500,
            "epoch_steps": 500,
            "meta_batch": batch,
            "lr": 1e-3,
            "lr_schedule": "cosine",
            "min_lr": 1e-3 if imagenet else 1e-5,
            "clip": 10.0 if imagenet else None,
            "val_every": 2500,
            "checkpoint_every": 500,
        },
    }


_MAMLPP = {  # name: (description, paper row, values, timing)
    "omniglot-20w1s-mamlpp": (
        "MAML++ (MSL, DA, BNRS, BNWB, LSLR, CA), Conv4-64, Omniglot 20-way 1-shot (Vinyals split)",
        "MAML++ paper Table 1 (Antoniou et al. 2019), MAML++, Omniglot 20-way 1-shot: 97.65 +- 0.05",
        _mamlpp(
            {
                "name": "omniglot",
                "way": 20,
                "shot": 1,
                "query": 1,
                "options": {"class_split": "vinyals"},
                "train_split": "trainval",
                "val_split": None,
            },
            64,
            0.1,
            10,
            0,
            8,
        ),
        "mamlpp-omniglot-20w1s",
    ),
    "miniimagenet-5w1s-mamlpp": (
        "MAML++, Conv4-48, miniImageNet 5-way 1-shot",
        "MAML++ paper Table 2, MAML++, miniImageNet 5-way 1-shot: 52.15 +- 0.26; DropGrad Table 1 (their run): "
        "50.21 +- 0.50",
        _mamlpp({"name": "miniimagenet", "way": 5, "shot": 1, "query": 15}, 48, 0.01, 15, 11, 4),
        "mamlpp-miniimagenet-5w1s",
    ),
    "miniimagenet-5w5s-mamlpp": (
        "MAML++, Conv4-48, miniImageNet 5-way 5-shot",
        "MAML++ paper Table 2, MAML++, miniImageNet 5-way 5-shot: 68.32 +- 0.44; DropGrad Table 1 (their run): "
        "68.66 +- 0.46",
        _mamlpp({"name": "miniimagenet", "way": 5, "shot": 5, "query": 15}, 48, 0.01, 15, 11, 2),
        "mamlpp-miniimagenet-5w5s",
    ),
}
for _name, (_description, _paper, _values, _timing) in _MAMLPP.items():
    PRESETS[_name] = Preset(_name, _description, _paper, _values, timing=_timing)


# ----------------------------------------------------------------------------------- DropGrad
# Tseng et al. (2020), classification on miniImageNet with the ResNet-18 of Chen et al.'s
# CloserLookFewShot, from the released code (hytseng0509/DropGrad, built on CloserLookFewShot):
# 224x224 images for ResNets (84 for Conv nets); ``maml_approx``, first-order meta-gradients, is the
# default method; 4 tasks per meta-update, 5 inner steps of 0.01 adapting every parameter (batch norm
# included), Adam 1e-3, no gradient clipping; 400 x 4 "epochs" of 100 episodes = 40000 meta-updates;
# Gaussian DropGrad with rate 0.1 (the code's default; the paper uses 0.1 or 0.2) on every layer.
# Deviations, stated: our miniImageNet images are 84x84 files resized to 224 (CloserLookFewShot reads
# the full-size ImageNet images); no augmentation (the code's --train_aug: random resized crops, colour
# jitter, flips); 15 query images per class in training too (the code trains with 16); the model tested
# is the last one, not the best on validation (the paper's early stopping); DropGrad's Gaussian noise
# has the paper's variance p / (1 - p) (Eq. 6; the released code draws N(1, p^2)). Meta-SGD is the
# authors' own, unreleased implementation: ours is the same network with meta-learned per-weight step
# sizes (start 0.01), first order like their MAML; MetaSGD* starts its feature extractor from a
# supervised ResNet-18 trained on the 64 meta-training classes (`dropgrad-pretrain-resnet18`).
_DROPGRAD = {"name": "dropgrad", "kind": "gaussian", "p": 0.1}


def _closer_look(shot: int, step: str = "sgd") -> dict[str, Any]:
    return {
        "data": {"name": "miniimagenet", "way": 5, "shot": shot, "query": 15, "image_size": 224},
        "model": {"backbone": "resnet18", "options": {}},
        "inner": {"step": step, "lr": 0.01, "steps": 5, "first_order": True, "fast": ["*"]},
        "train": {
            "steps": 40000,
            "meta_batch": 4,
            "lr": 1e-3,
            "clip": None,
            "val_every": 2500,
            "val_episodes": 100,
            "checkpoint_every": 250,
        },
    }


def _dropgrad(values: dict[str, Any], **options: Any) -> dict[str, Any]:
    out = _with(values)
    out["inner"] = out["inner"] | {"transforms": [_DROPGRAD | options]}
    return out


# Table 1 rows: key -> (label, step, pretrained, numbers (1-shot no/with DropGrad, 5-shot no/with))
_TABLE1_ROWS = {
    "maml": ("MAML", "sgd", False, ("49.61 +- 0.92", "52.35 +- 0.86", "65.72 +- 0.77", "69.42 +- 0.73")),
    "metasgd": ("MetaSGD", "meta-sgd", False, ("51.51 +- 0.87", "53.38 +- 0.93", "69.67 +- 0.75", "71.14 +- 0.72")),
    "metasgd-pretrained": (
        "MetaSGD*",
        "meta-sgd",
        True,
        ("60.44 +- 0.87", "61.69 +- 0.84", "72.55 +- 0.54", "73.33 +- 0.57"),
    ),
}
_PRETRAIN_RUN = "runs/dropgrad-pretrain-resnet18"  # the default --out of the pre-training preset
for _key, (_label, _step, _pretrained, _numbers) in _TABLE1_ROWS.items():
    for _shot, (_without, _with_dg) in ((1, _numbers[:2]), (5, _numbers[2:])):
        _values = _closer_look(_shot, _step)
        if _pretrained:
            _values["model"] = _values["model"] | {"init_from": _PRETRAIN_RUN}
        _base = f"dropgrad-{_key}-5w{_shot}s"
        _what = f"{_label}, ResNet-18 (224x224), miniImageNet 5-way {_shot}-shot"
        _needs = " (first: metareg perturb transfer --preset dropgrad-pretrain-resnet18)" if _pretrained else ""
        PRESETS[_base] = Preset(
            _base,
            _what + _needs,
            f"DropGrad Table 1, {_label}, {_shot}-shot: {_without}",
            _values,
            timing=f"resnet18-5w{_shot}s" + ("-metasgd" if _step == "meta-sgd" else ""),
        )
        PRESETS[f"{_base}-dropgrad"] = Preset(
            f"{_base}-dropgrad",
            f"{_label} w/ Gaussian DropGrad (p = 0.1), ResNet-18, miniImageNet 5-way {_shot}-shot" + _needs,
            f"DropGrad Table 1, {_label} w/ Gaussian DropGrad, {_shot}-shot: {_with_dg}",
            _dropgrad(_values),
            timing=f"resnet18-5w{_shot}s" + ("-metasgd" if _step == "meta-sgd" else ""),
        )
for _shot, (_without, _with_dg) in ((1, ("50.21 +- 0.50", "51.13 +- 0.50")), (5, ("68.66 +- 0.46", "69.80 +- 0.46"))):
    _mamlpp_preset = PRESETS[f"miniimagenet-5w{_shot}s-mamlpp"]
    PRESETS[f"dropgrad-mamlpp-5w{_shot}s"] = Preset(
        f"dropgrad-mamlpp-5w{_shot}s",
        _mamlpp_preset.description,
        f"DropGrad Table 1, MAML++ (the original code, their run), {_shot}-shot: {_without}",
        _mamlpp_preset.values,
        timing=_mamlpp_preset.timing,
    )
    PRESETS[f"dropgrad-mamlpp-5w{_shot}s-dropgrad"] = Preset(
        f"dropgrad-mamlpp-5w{_shot}s-dropgrad",
        _mamlpp_preset.description.replace("MAML++", "MAML++ w/ Gaussian DropGrad (p = 0.1)", 1),
        f"DropGrad Table 1, MAML++ w/ Gaussian DropGrad, {_shot}-shot: {_with_dg}",
        _dropgrad(_mamlpp_preset.values),
        timing=_mamlpp_preset.timing,
    )

# Table 2: which layers (MAML, 5-shot). The paper's ResNet-18 is "a convolutional layer (Conv), 4
# residual blocks (Block1-4) and FC": our groups stem, stage1-4 and head.
_TABLE2 = {
    "fc": ("FC", "head", "68.93 +- 0.55"),
    "block4-fc": ("Block4 + FC", "stage4+head", "69.02 +- 0.57"),
    "block1-conv": ("Block1 + Conv", "stage1+stem", "64.96 +- 0.80"),
    "conv": ("Conv", "stem", "65.53 +- 0.75"),
}
for _suffix, (_label, _layers, _number) in _TABLE2.items():
    PRESETS[f"dropgrad-maml-5w5s-dropgrad-{_suffix}"] = Preset(
        f"dropgrad-maml-5w5s-dropgrad-{_suffix}",
        f"MAML w/ Gaussian DropGrad on {_label} only, ResNet-18, miniImageNet 5-way 5-shot",
        f"DropGrad Table 2, DropGrad on {_label}: {_number}",
        _dropgrad(_closer_look(5), layers=_layers),
        timing="resnet18-5w5s",
    )

# Table 3: MAML 5-shot over the inner step size alpha and the inner steps (the (0.01, 5) column is Table 1's).
_TABLE3 = {
    "a0.1": (0.1, 5, "65.98 +- 0.79", "67.78 +- 0.73"),
    "a0.001": (0.001, 5, "58.55 +- 0.80", "64.05 +- 0.79"),
    "n3": (0.01, 3, "64.84 +- 0.80", "65.42 +- 0.80"),
    "n7": (0.01, 7, "68.11 +- 0.74", "69.65 +- 0.70"),
}
for _suffix, (_alpha, _steps, _without, _with_dg) in _TABLE3.items():
    _values = _closer_look(5)
    _values["inner"] = _values["inner"] | {"lr": _alpha, "steps": _steps}
    _timing = "resnet18-5w5s" if _steps == 5 else f"resnet18-5w5s-{_steps}steps"
    PRESETS[f"dropgrad-maml-5w5s-{_suffix}"] = Preset(
        f"dropgrad-maml-5w5s-{_suffix}",
        f"MAML, alpha {_alpha:g}, {_steps} inner steps, ResNet-18, miniImageNet 5-way 5-shot",
        f"DropGrad Table 3, MAML (alpha, n_inner) = ({_alpha:g}, {_steps}): {_without}",
        _values,
        timing=_timing,
    )
    PRESETS[f"dropgrad-maml-5w5s-{_suffix}-dropgrad"] = Preset(
        f"dropgrad-maml-5w5s-{_suffix}-dropgrad",
        f"MAML w/ Gaussian DropGrad, alpha {_alpha:g}, {_steps} inner steps, ResNet-18, miniImageNet 5-way 5-shot",
        f"DropGrad Table 3, MAML w/ DropGrad (alpha, n_inner) = ({_alpha:g}, {_steps}): {_with_dg}",
        _dropgrad(_values),
        timing=_timing,
    )

# Table 4: cross-domain, meta-trained on miniImageNet (validated there), meta-tested on CUB's novel
# classes (Chen et al.'s split, data set `cub`). Dropout: rate 0.3 on the activations of every pass
# while meta-training (support and query: f_theta and f_theta'), off at meta-test.
_DROPOUT = {"name": "dropout", "options": {"p": 0.3, "during": "training"}}
_TABLE4 = {  # row key -> (label, base preset key, variant, numbers 1-shot, 5-shot)
    "maml": ("MAML", "maml", "", ("31.52 +- 0.52", "45.56 +- 0.51")),
    "maml-dropout": ("MAML w/ Dropout", "maml", "dropout", ("31.84 +- 0.49", "46.48 +- 0.50")),
    "maml-dropgrad": ("MAML w/ DropGrad", "maml", "dropgrad", ("33.20 +- 0.67", "51.05 +- 0.56")),
    "metasgd": ("MetaSGD", "metasgd", "", ("34.52 +- 0.63", "49.22 +- 0.58")),
    "metasgd-dropout": ("MetaSGD w/ Dropout", "metasgd", "dropout", ("35.01 +- 0.54", "52.35 +- 0.58")),
    "metasgd-dropgrad": ("MetaSGD w/ DropGrad", "metasgd", "dropgrad", ("36.77 +- 0.72", "55.13 +- 0.72")),
    "metasgd-pretrained": ("MetaSGD*", "metasgd-pretrained", "", ("43.98 +- 0.77", "57.95 +- 0.81")),
    "metasgd-pretrained-dropgrad": (
        "MetaSGD* w/ DropGrad",
        "metasgd-pretrained",
        "dropgrad",
        ("45.33 +- 0.81", "59.94 +- 0.82"),
    ),
    "mamlpp": ("MAML++", "mamlpp", "", ("40.73 +- 0.49", "60.57 +- 0.49")),
    "mamlpp-dropout": ("MAML++ w/ Dropout", "mamlpp", "dropout", ("41.75 +- 0.49", "61.48 +- 0.49")),
    "mamlpp-dropgrad": ("MAML++ w/ DropGrad", "mamlpp", "dropgrad", ("44.27 +- 0.50", "63.79 +- 0.48")),
}
for _key, (_label, _base_key, _variant, _numbers) in _TABLE4.items():
    for _shot, _number in zip((1, 5), _numbers):
        _source = PRESETS[f"dropgrad-{_base_key}-5w{_shot}s" + ("-dropgrad" if _variant == "dropgrad" else "")]
        _values = _with(_source.values, data={"test_name": "cub"})
        if _variant == "dropout":
            _values["perturb"] = _DROPOUT
        PRESETS[f"dropgrad-cub-{_key}-5w{_shot}s"] = Preset(
            f"dropgrad-cub-{_key}-5w{_shot}s",
            f"{_label}: meta-train on miniImageNet 5-way {_shot}-shot, meta-test on CUB (cross-domain)",
            f"DropGrad Table 4, {_label}, {_shot}-shot: {_number}",
            _values,
            timing=_source.timing,
        )

# MetaSGD*'s pre-training (DropGrad Section 4.1, CloserLookFewShot's "baseline" training): ResNet-18
# by supervised classification of the 64 meta-training classes, Adam 1e-3, batch 16, no weight decay
# and no schedule, 224x224; CloserLookFewShot trains 400 epochs over all 600 images of each class
# (960000 steps). Deviations: 90% of each class's images for training and 10% held out for the
# test accuracy (the reference has no held-out test); our augmentation is the transfer runs' random
# crops and flips (the reference: random resized crops, colour jitter, flips).
PRESETS["dropgrad-pretrain-resnet18"] = Preset(
    "dropgrad-pretrain-resnet18",
    "ResNet-18 trained to classify miniImageNet's 64 meta-training classes (MetaSGD*'s feature extractor), 224x224",
    "DropGrad Section 4.1: MetaSGD*'s pre-trained feature extractor for its rows (no number of its own)",
    {
        "data": {
            "name": "miniimagenet",
            "image_size": 224,
            "train_split": "train",
            "test_split": "train",
            "train_per_class": 540,
        },
        "model": {"backbone": "resnet18"},
        "perturb": {"name": "none"},
        "train": {
            "steps": 960000,
            "batch_size": 16,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "milestones": [],
            "log_every": 100,
            "checkpoint_every": 2000,
        },
    },
    "transfer",
    timing="resnet18-pretrain",
)


# -------------------------------------------------------------------------- MetaPerturb Table 3
# The ablations are options of the same perturbation and of the source split (meta-train and transfer
# take the same options): s = 1, z = 1, the slots' location, and the homogeneous task split.
# suffix -> (label, perturbation options, meta-train extra values, numbers s-CIFAR100 / Aircraft / CUB)
_ABLATIONS: dict[str, tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    "noscale": (
        "w/o channel-wise scaling s",
        {"scale": False},
        {},
        ("32.65 +- 0.40", "63.56 +- 1.30", "33.63 +- 0.92"),
    ),
    "nonoise": ("w/o stochastic noise z", {"noise": False}, {}, ("31.02 +- 0.44", "58.32 +- 0.92", "30.26 +- 0.67")),
    "before-pooling": (
        "only before pooling",
        {"location": "before-pooling"},
        {},
        ("32.89 +- 0.33", "61.39 +- 1.01", "38.88 +- 1.15"),
    ),
    "top": ("only at top layers", {"location": "top"}, {}, ("32.57 +- 0.46", "57.51 +- 0.72", "37.89 +- 0.58")),
    "bottom": (
        "only at bottom layers",
        {"location": "bottom"},
        {},
        ("31.77 +- 0.42", "61.32 +- 0.29", "33.48 +- 0.57"),
    ),
    "homogeneous": (
        "homogeneous task distribution",
        {},
        {"task_split": "instances"},
        ("34.31 +- 0.88", "65.41 +- 0.76", "40.64 +- 0.31"),
    ),
}
for _suffix, (_label, _options, _extra, _numbers) in _ABLATIONS.items():
    _values = _meta_train("tinyimagenet") | _extra
    if _options:
        _values["perturb"] = {"options": _options}
    PRESETS[f"perturb-tinyimagenet-resnet20-{_suffix}"] = Preset(
        f"perturb-tinyimagenet-resnet20-{_suffix}",
        f"MetaPerturb {_label}: meta-training as perturb-tinyimagenet-resnet20; transfer its phi "
        + (f"with --set perturb.options='{json.dumps(_options)}'" if _options else "as usual"),
        f"MetaPerturb Table 3, {_label}: s-CIFAR100 {_numbers[0]}, Aircraft {_numbers[1]}, CUB {_numbers[2]}",
        _values,
        "meta-train",
        timing="metaperturb-meta-train-resnet20",
    )


# ---------------------------------------------------------------------------- MT-net Table 6.3
# Lee & Choi's MT-net code (yoonholee/MT-net experiments/omniglot.sh, miniimagenet.sh, on MAML's code):
# Omniglot 5-way: 40000 iterations, 32 tasks, 1 inner step of 0.4; 20-way: 40000, 16 tasks, 1 step of
# 0.1; strided Conv4-64; miniImageNet: 60000, 4 tasks, 5 steps of 0.01, Conv4-32 with max-pooling,
# gradients clipped to +-10; Adam 1e-3; one query image per class on Omniglot (15 on miniImageNet); T a
# 1x1 convolution after every W, masks per output channel ("share_M"), logits from 0, temperature 1;
# batch norm with a learned shift only, not adapted; meta-test with 3 / 5 / 10 inner steps (thesis
# Section 6.4). Deviations: Glorot-uniform weights for the classifier too (MAML's Omniglot classifier
# starts N(0, 1)); the Omniglot features are flattened (2x2x64) where MAML averages them over space;
# our Omniglot split is Vinyals' with rotations as classes (MAML rotates characters per task); 1000
# test episodes (the code: 600 on Omniglot, 4000 on miniImageNet).
def _mtnet_values(setting: str) -> dict[str, Any]:
    if setting == "miniimagenet-5w1s":
        data = {"name": "miniimagenet", "way": 5, "shot": 1, "query": 15}
        model = {"channels": 32}
        inner = {"lr": 0.01, "steps": 5, "eval_steps": 10}
        train: dict[str, Any] = {"steps": 60000, "meta_batch": 4, "clip": 10.0}
    else:
        way = 5 if setting == "omniglot-5w1s" else 20
        data = {
            "name": "omniglot",
            "way": way,
            "shot": 1,
            "query": 1,
            "options": {"class_split": "vinyals"},
            "train_split": "trainval",
            "val_split": None,
        }
        model = {"channels": 64, "strided": True}
        inner = {"lr": 0.4 if way == 5 else 0.1, "steps": 1, "eval_steps": 3 if way == 5 else 5}
        train = {"steps": 40000, "meta_batch": 32 if way == 5 else 16, "clip": None}
    return {
        "data": data,
        "model": {"backbone": "conv4", "options": model | {"init": "xavier", "norm_scale": False}},
        "inner": {"step": "sgd", "fast": _CONV_FAST} | inner,
        "train": {"lr": 1e-3, "val_every": 2000, "checkpoint_every": 500} | train,
    }


_TABLE_6_3 = {  # setting -> (description, numbers for MAML, T-net, MT-net)
    "omniglot-5w1s": ("Omniglot 5-way 1-shot", ("98.7 +- 0.4", "99.4 +- 0.3", "99.5 +- 0.3")),
    "omniglot-20w1s": ("Omniglot 20-way 1-shot", ("95.8 +- 0.3", "96.1 +- 0.3", "96.2 +- 0.4")),
    "miniimagenet-5w1s": ("miniImageNet 5-way 1-shot", ("48.70 +- 1.84", "50.86 +- 1.82", "51.70 +- 1.84")),
}
for _setting, (_title, _numbers) in _TABLE_6_3.items():
    for _model, _number in zip(("maml", "tnet", "mtnet"), _numbers):
        _values = _mtnet_values(_setting)
        if _model != "maml":
            _values["model"]["options"]["transform"] = True
        if _model == "mtnet":
            _values["inner"]["transforms"] = [{"name": "subspace-mask", "per": "row"}]
        _label = {"maml": "MAML (the thesis quotes Finn et al.'s number)", "tnet": "T-net", "mtnet": "MT-net"}[_model]
        _name = f"mtnet-{_setting}" + ("" if _model == "maml" else f"-{_model}")
        PRESETS[_name] = Preset(
            _name,
            f"{_label.split(' (')[0]}, MT-net code settings, {_title}",
            f"MT-net thesis Table 6.3, {_label}, {_title}: {_number}",
            _values,
            timing=f"mtnet-{_setting}",
        )


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run `metareg presets` to list them")
    return PRESETS[name]
