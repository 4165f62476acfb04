"""Named presets: each mirrors one experiment of the seeds and names the paper row it reproduces.

Values are partial configs merged over the defaults of ``metareg.config.Config``. Hyperparameters of
the classification presets are those of the Meta-Dropout reference README (which the paper's
Table 1 was produced with); the sine presets follow the MT-net thesis, Section 6.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    paper: str  # the row it reproduces, with the paper's number
    values: dict[str, Any]


def _omniglot(way: int, shot: int, lr: float, meta_lr: float) -> dict[str, Any]:
    return {
        "data": {"name": "omniglot", "way": way, "shot": shot, "query": 15, "options": {"class_split": "vinyals"},
                 # The 4800 meta-train classes of the Vinyals split include its validation classes,
                 # so a validation score would not be held out: none is computed.
                 "train_split": "trainval", "val_split": None},
        "model": {"backbone": "conv4", "options": {"channels": 64}},
        "inner": {"step": "sgd", "lr": lr, "steps": 5},
        "train": {"iterations": 60000, "meta_batch": 4, "meta_lr": meta_lr, "clip": 3.0, "val_every": 2000, "checkpoint_every": 500},
    }


def _miniimagenet(shot: int) -> dict[str, Any]:
    return {
        "data": {"name": "miniimagenet", "way": 5, "shot": shot, "query": 15},
        "model": {"backbone": "conv4", "options": {"channels": 32}},
        "inner": {"step": "sgd", "lr": 0.01, "steps": 5},
        "train": {"iterations": 60000, "meta_batch": 4, "meta_lr": 1e-4, "clip": 3.0, "val_every": 2000, "checkpoint_every": 500},
    }


def _sine(step: str) -> dict[str, Any]:
    # Thesis 6.1: 2 hidden cells of 40, Adam 1e-3, alpha 0.01, W ~ truncated normal (std 0.01).
    return {
        "data": {"name": "sine", "shot": 10, "query": 10},
        "model": {"backbone": "mlp", "options": {"hidden": [40, 40], "init": "truncated_normal"}},
        "inner": {"step": step, "lr": 0.01, "steps": 1},
        "train": {"iterations": 60000, "meta_batch": 4, "meta_lr": 1e-3, "clip": None, "val_every": 5000, "val_episodes": 500, "log_every": 100, "checkpoint_every": 5000},
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
                "train": {"iterations": 600, "meta_batch": 4, "meta_lr": 1e-3, "val_every": 200, "val_episodes": 100, "checkpoint_every": 100},
                "eval": {"episodes": 1000},
            },
        ),
        Preset("omniglot-20w1s", "MAML, Conv4-64, Omniglot 20-way 1-shot (Vinyals split)", "Meta-Dropout Table 1, MAML, Omniglot 20-way 1-shot: 95.23 +- 0.17", _omniglot(20, 1, 0.1, 3e-4)),
        Preset("omniglot-20w5s", "MAML, Conv4-64, Omniglot 20-way 5-shot (Vinyals split)", "Meta-Dropout Table 1, MAML, Omniglot 20-way 5-shot: 98.38 +- 0.07", _omniglot(20, 5, 0.4, 1e-3)),
        Preset("miniimagenet-5w1s", "MAML, Conv4-32, miniImageNet 5-way 1-shot", "Meta-Dropout Table 1, MAML, miniImageNet 5-way 1-shot: 49.58 +- 0.65", _miniimagenet(1)),
        Preset("miniimagenet-5w5s", "MAML, Conv4-32, miniImageNet 5-way 5-shot", "Meta-Dropout Table 1, MAML, miniImageNet 5-way 5-shot: 64.55 +- 0.52", _miniimagenet(5)),
        Preset("sine-10shot", "MAML, 1-40-40-1 MLP, sine regression 10-shot, one inner step, alpha 0.01", "MT-net thesis Table 6.1, MAML, 10-shot: MSE 0.71 +- 0.07", _sine("sgd")),
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


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run `metareg presets` to list them")
    return PRESETS[name]
