"""``metareg reproduce``: a paper's table or figure as a grid of runs, resumable, written as markdown.

Each experiment is a list of runs (a preset plus overrides) and the shots each run is tested at.
Runs are ``metareg train`` / ``metareg perturb meta-train`` / ``metareg perturb transfer``
subprocesses (``--jobs`` at a time, one thread each); meta-training runs finish before the others
start (transfers use their phi: ``{out}`` in an override is the experiment's folder). A killed
experiment continues where it stopped: finished runs are kept, unfinished ones resume from their
checkpoints, and test results already written are reused. Episodic numbers are the mean +- 95% CI
over ``--episodes`` test tasks from the fixed test stream, next to the paper's; transfer numbers are
test accuracies aggregated over training seeds (mean +- std) with paired differences. A run whose
loss became NaN/Inf is reported as diverged, not hidden.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import read_checkpoint_meta
from ..errors import ConfigError
from ..memory import require
from ..runfolder import read_result, read_run
from ..runlock import run_lock

# What a run's log says when it stopped because it diverged (metareg.meta.loop's messages).
DIVERGED = re.compile(r"became (nan|inf|-inf)|non-finite values|the loss on the new weights|update overflowed")


@dataclass(frozen=True)
class Run:
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    shots: tuple[int, ...] = (10,)
    paper: dict[int, str] = field(default_factory=dict)  # shot -> the paper's number
    row: str = ""  # the table row it belongs to
    column: str = ""  # the table column it belongs to
    seed: int = 0  # training seed
    group: str = ""  # runs of one group (repeats over seeds) are aggregated in figures
    command: str = "train"  # train | meta-train | transfer
    stage: int = 1  # runs of stage 0 (phi, source networks) finish before the others start


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str
    runs: tuple[Run, ...]
    columns: tuple[str, ...]
    # "mask-fractions": draw Figure 6.1; "seeds": transfer accuracies over seeds; "loss-surface": also draw
    # the runs' loss surfaces (MetaPerturb Figure 8)
    figure: str | None = None
    scale: float = 1.0  # 100: accuracies reported in %
    pairs: tuple[tuple[str, str], ...] = ()  # (row A, row B): A - B on the same episodes, per column
    note: str = ""  # what the report must say about the setting (deviations from the paper)


def _table_6_1() -> Experiment:
    paper = {
        "MAML": ("sine-10shot", ["1.07 +- 0.11", "0.71 +- 0.07", "0.50 +- 0.05"]),
        "Meta-SGD": ("sine-10shot-metasgd", ["0.88 +- 0.14", "0.53 +- 0.09", "0.35 +- 0.06"]),
        "M-net-full": ("sine-10shot-mnet-full", ["0.91 +- 0.09", "0.63 +- 0.07", "0.38 +- 0.04"]),
        "M-net": ("sine-10shot-mnet", ["0.88 +- 0.09", "0.60 +- 0.06", "0.41 +- 0.04"]),
        "T-net": ("sine-10shot-tnet", ["0.83 +- 0.08", "0.56 +- 0.06", "0.38 +- 0.04"]),
        "MT-net-full": ("sine-10shot-mtnet-full", ["0.81 +- 0.08", "0.51 +- 0.05", "0.35 +- 0.04"]),
        "MT-net": ("sine-10shot-mtnet", ["0.76 +- 0.09", "0.49 +- 0.05", "0.33 +- 0.04"]),
    }
    runs = tuple(
        Run(
            preset.removeprefix("sine-10shot-") if preset != "sine-10shot" else "maml",
            preset,
            shots=(5, 10, 20),
            paper=dict(zip((5, 10, 20), values)),
            row=label,
        )
        for label, (preset, values) in paper.items()
    )
    return Experiment(
        "mtnet-table-6.1",
        "Sine regression, meta-trained 10-shot, MSE after adaptation with K shots",
        "MT-net thesis Table 6.1",
        runs,
        ("5-shot", "10-shot", "20-shot"),
    )


def _table_6_2() -> Experiment:
    paper = {
        10.0: ("171.92 +- 25.04", "4.08 +- 0.30", "4.18 +- 0.30"),
        1.0: ("5.81 +- 0.49", "4.15 +- 0.30", "0.61 +- 0.07"),
        0.1: ("1.05 +- 0.11", "0.68 +- 0.06", "0.54 +- 0.05"),
        0.01: ("0.71 +- 0.07", "0.56 +- 0.06", "0.49 +- 0.05"),
        0.001: ("0.82 +- 0.08", "0.59 +- 0.06", "0.59 +- 0.06"),
        0.0001: ("2.54 +- 0.19", "0.62 +- 0.06", "0.72 +- 0.07"),
    }
    models = (("MAML", "sine-10shot"), ("T-net", "sine-10shot-tnet"), ("MT-net", "sine-10shot-mtnet"))
    runs = []
    for alpha, values in paper.items():
        for (label, preset), value in zip(models, values):
            base = preset.removeprefix("sine-10shot-") if preset != "sine-10shot" else "maml"
            # alpha = 0.01 is the presets' own setting: the same run as Table 6.1's (shared when both
            # experiments use the same --out folder).
            name = base if alpha == 0.01 else f"{base}-alpha{alpha:g}"
            overrides = () if alpha == 0.01 else (f"inner.lr={alpha}",)
            runs.append(Run(name, preset, overrides, (10,), {10: value}, row=f"{alpha:g}", column=label))
    return Experiment(
        "mtnet-table-6.2",
        "10-shot sine regression MSE for inner step sizes alpha",
        "MT-net thesis Table 6.2",
        tuple(runs),
        tuple(label for label, _ in models),
    )


def _figure_6_1(seeds: tuple[int, ...] = (0, 1, 2)) -> Experiment:
    # The thesis shows one bar per order; three meta-training seeds per order show how much of the
    # trend is run-to-run noise.
    runs = tuple(
        Run(
            f"mtnet-poly{order}" + (f"-seed{seed}" if seed else ""),
            "sine-10shot-mtnet",
            ("data.name=polynomial", f"data.options={{order: {order}}}"),
            (10,),
            row=f"order {order}, seed {seed}",
            seed=seed,
            group=f"order {order}",
        )
        for order in (0, 1, 2)
        for seed in seeds
    )
    return Experiment(
        "mtnet-figure-6.1",
        "MT-net on 10-shot polynomial regression: fraction of weights a task changes",
        "MT-net thesis Figure 6.1",
        runs,
        ("10-shot MSE",),
        figure="mask-fractions",
    )


def _dropgrad_figure_2() -> Experiment:
    runs = [Run("maml", "sine-10shot", row="p = 0 (MAML)", column="binary")]
    for p in (0.1, 0.2, 0.3, 0.5):
        for kind in ("binary", "gaussian"):
            runs.append(
                Run(
                    f"dropgrad-{kind}-p{p:g}",
                    "sine-10shot",
                    (f"inner.transforms=[{{name: dropgrad, kind: {kind}, p: {p}}}]",),
                    row=f"p = {p:g}",
                    column=kind,
                )
            )
    return Experiment(
        "dropgrad-figure-2",
        "DropGrad, binary vs Gaussian, on 10-shot sine regression (MSE; the paper used miniImageNet)",
        "DropGrad Figure 2 (setting changed to one that runs on a CPU)",
        tuple(runs),
        ("binary", "gaussian"),
    )


def _metaperturb(target: str, archs: tuple[str, ...], seeds: tuple[int, ...] = (0, 1, 2)) -> Experiment:
    """Base vs MetaPerturb on a data-scarce target, each backbone trained from scratch with 3 seeds;
    phi meta-trained once with ResNet20 on miniImageNet's 64 meta-train classes, so the Conv4 rows
    test the cross-architecture claim (the paper's Table 2 setting)."""
    runs = [Run("source-resnet20", "perturb-miniimagenet-resnet20", row="phi", command="meta-train", stage=0)]
    for arch in archs:
        for seed in seeds:
            for column, overrides in (
                ("Base", ("perturb.name=none",)),
                ("MetaPerturb", ("perturb.phi={out}/source-resnet20",)),
            ):
                runs.append(
                    Run(
                        f"{target}-{arch}-{column.lower()}-seed{seed}",
                        f"transfer-{target}",
                        (f"model.backbone={arch}", *overrides),
                        row=arch,
                        column=column,
                        seed=seed,
                        group=f"{arch} {column}",
                        command="transfer",
                    )
                )
    title = {
        "miniimagenet": "miniImageNet's 20 meta-test classes, 50 training images per class",
        "omniglot": "100 Omniglot characters (a dissimilar domain), 10 training drawings per class",
    }[target]
    return Experiment(
        f"metaperturb-{target}",
        f"MetaPerturb transfer: {title} (test accuracy, %)",
        "MetaPerturb Tables 1-2 (setting: our CPU-sized stand-in; source miniImageNet instead of Tiny ImageNet)",
        tuple(runs),
        ("Base", "MetaPerturb"),
        figure="seeds",
    )


def _metaperturb_finetuning(seeds: tuple[int, ...] = (0, 1, 2)) -> Experiment:
    """Table 1's fine-tuning rows: ResNet20 pre-trained on the 64 source classes, then fine-tuned on
    the target, without and with MetaPerturb."""
    runs = [
        Run("source-resnet20", "perturb-miniimagenet-resnet20", row="phi", command="meta-train", stage=0),
        Run("source-network-resnet20", "source-miniimagenet", row="source", command="transfer", stage=0),
    ]
    for seed in seeds:
        for column, overrides in (
            ("Fine-tuning", ("perturb.name=none",)),
            ("Fine-tuning + MetaPerturb", ("perturb.phi={out}/source-resnet20",)),
        ):
            runs.append(
                Run(
                    f"miniimagenet-resnet20-{'ft' if column == 'Fine-tuning' else 'ft-metaperturb'}-seed{seed}",
                    "transfer-miniimagenet",
                    ("init_from={out}/source-network-resnet20", *overrides),
                    row="resnet20",
                    column=column,
                    seed=seed,
                    command="transfer",
                )
            )
    return Experiment(
        "metaperturb-finetuning",
        "MetaPerturb with fine-tuning: miniImageNet's 20 meta-test classes, 50 training images "
        "per class, ResNet20 pre-trained on the 64 meta-train classes (test accuracy, %)",
        "MetaPerturb Table 1, FT rows (setting: our CPU-sized stand-in)",
        tuple(runs),
        ("Fine-tuning", "Fine-tuning + MetaPerturb"),
        figure="seeds",
    )


def _metadropout_table_1() -> Experiment:
    """Meta-Dropout Table 1: MAML and Meta-SGD with and without Meta-Dropout on the four settings, at
    the paper's schedule (60000 meta-iterations each: a GPU's work, run in --time-budget chunks)."""
    from .presets import _BASES, PRESETS

    rows = (
        ("MAML", ""),
        ("MAML + Meta-dropout", "-metadropout"),
        ("Meta-SGD", "-metasgd"),
        ("Meta-SGD + Meta-dropout", "-metasgd-metadropout"),
    )
    runs = []
    for base, (_, column) in _BASES.items():  # the Omniglot 1-shot pair first: with a GPU's chunks, it finishes first
        for label, suffix in rows:
            preset = PRESETS[base + suffix]
            shot = preset.values["data"]["shot"]
            paper = re.search(r"(\d+\.\d+ \+- \d+\.\d+)$", preset.paper)
            runs.append(
                Run(
                    base + suffix,
                    base + suffix,
                    shots=(shot,),
                    paper={shot: paper.group(1)} if paper else {},
                    row=label,
                    column=column,
                )
            )
    return Experiment(
        "metadropout-table-1",
        "Few-shot classification accuracy (%), Meta-Dropout Table 1",
        "Meta-Dropout Table 1",
        tuple(runs),
        tuple(column for _, column in _BASES.values()),
        scale=100.0,
        pairs=(("MAML + Meta-dropout", "MAML"), ("Meta-SGD + Meta-dropout", "Meta-SGD")),
    )


def _paper_number(preset: str) -> str | None:
    """The paper's number at the end of a preset's paper row ("... : 52.15 +- 0.26")."""
    from .presets import PRESETS

    found = re.search(r": (\d+\.\d+ \+- \d+\.\d+)", PRESETS[preset].paper)
    return found.group(1) if found else None


def _episodic_cell(name: str, preset: str, row: str, column: str, shot: int, *overrides: str) -> Run:
    number = _paper_number(preset)
    return Run(name, preset, overrides, (shot,), {shot: number} if number else {}, row=row, column=column)


_PRETRAIN = Run("pretrain-resnet18", "dropgrad-pretrain-resnet18", row="pre-training", command="transfer", stage=0)
_FROM_PRETRAIN = "model.init_from={out}/pretrain-resnet18"
_DROPGRAD_NOTE = (
    "Setting: the released DropGrad/CloserLookFewShot code's (ResNet-18 at 224x224, first-order MAML, 4 tasks, "
    "5 steps of 0.01, Adam 1e-3, 40000 meta-updates; Gaussian DropGrad p = 0.1); deviations in metareg.runs.presets "
    "(no augmentation, the final model rather than the best on validation, 84x84 images resized to 224)."
)


def _dropgrad_table_1() -> Experiment:
    rows = (
        ("MAML", "maml", ""),
        ("MAML w/ Gaussian DropGrad", "maml", "-dropgrad"),
        ("MetaSGD", "metasgd", ""),
        ("MetaSGD w/ Gaussian DropGrad", "metasgd", "-dropgrad"),
        ("MetaSGD*", "metasgd-pretrained", ""),
        ("MetaSGD* w/ Gaussian DropGrad", "metasgd-pretrained", "-dropgrad"),
        ("MAML++", "mamlpp", ""),
        ("MAML++ w/ Gaussian DropGrad", "mamlpp", "-dropgrad"),
    )
    runs = [_PRETRAIN]
    for shot in (1, 5):
        for label, key, suffix in rows:
            preset = f"dropgrad-{key}-5w{shot}s{suffix}"
            extra = (_FROM_PRETRAIN,) if key == "metasgd-pretrained" else ()
            runs.append(_episodic_cell(preset.removeprefix("dropgrad-"), preset, label, f"{shot}-shot", shot, *extra))
    return Experiment(
        "dropgrad-table-1",
        "Few-shot classification on miniImageNet (accuracy, %), DropGrad Table 1",
        "DropGrad Table 1",
        tuple(runs),
        ("1-shot", "5-shot"),
        scale=100.0,
        pairs=tuple((f"{label} w/ Gaussian DropGrad", label) for label in ("MAML", "MetaSGD", "MetaSGD*", "MAML++")),
        note=_DROPGRAD_NOTE,
    )


def _dropgrad_table_2() -> Experiment:
    rows = (
        ("Origin", "dropgrad-maml-5w5s"),
        ("FC", "dropgrad-maml-5w5s-dropgrad-fc"),
        ("Block4 + FC", "dropgrad-maml-5w5s-dropgrad-block4-fc"),
        ("Full", "dropgrad-maml-5w5s-dropgrad"),
        ("Block1 + Conv", "dropgrad-maml-5w5s-dropgrad-block1-conv"),
        ("Conv", "dropgrad-maml-5w5s-dropgrad-conv"),
    )
    runs = tuple(_episodic_cell(p.removeprefix("dropgrad-"), p, label, "5-shot", 5) for label, p in rows)
    return Experiment(
        "dropgrad-table-2",
        "DropGrad on different layers: MAML, miniImageNet 5-way 5-shot (accuracy, %), DropGrad Table 2",
        "DropGrad Table 2",
        runs,
        ("5-shot",),
        scale=100.0,
        pairs=tuple((label, "Origin") for label, _ in rows[1:]),
        note=_DROPGRAD_NOTE,
    )


def _dropgrad_table_3() -> Experiment:
    columns: tuple[tuple[str, str], ...]
    columns = (("0.01, 5 (original)", ""), ("0.1, 5", "-a0.1"), ("0.001, 5", "-a0.001"), ("0.01, 3", "-n3"))
    columns += (("0.01, 7", "-n7"),)
    runs = []
    for column, suffix in columns:
        for label, dropgrad in (("MAML", ""), ("MAML w/ DropGrad", "-dropgrad")):
            preset = f"dropgrad-maml-5w5s{suffix}{dropgrad}"
            runs.append(_episodic_cell(preset.removeprefix("dropgrad-"), preset, label, column, 5))
    return Experiment(
        "dropgrad-table-3",
        "MAML 5-shot on miniImageNet over the inner step size alpha and inner steps (accuracy, %), DropGrad Table 3",
        "DropGrad Table 3",
        tuple(runs),
        tuple(column for column, _ in columns),
        scale=100.0,
        pairs=(("MAML w/ DropGrad", "MAML"),),
        note=_DROPGRAD_NOTE,
    )


def _dropgrad_table_4() -> Experiment:
    from .presets import _TABLE4

    runs = [_PRETRAIN]
    for shot in (1, 5):
        for key, (label, base, _variant, _numbers) in _TABLE4.items():
            preset = f"dropgrad-cub-{key}-5w{shot}s"
            extra = (_FROM_PRETRAIN,) if base == "metasgd-pretrained" else ()
            runs.append(_episodic_cell(preset.removeprefix("dropgrad-"), preset, label, f"{shot}-shot", shot, *extra))
    bases = ("MAML", "MetaSGD", "MetaSGD*", "MAML++")
    pairs = tuple((f"{b} w/ DropGrad", b) for b in bases) + tuple(
        (f"{b} w/ Dropout", b) for b in ("MAML", "MetaSGD", "MAML++")
    )
    return Experiment(
        "dropgrad-table-4",
        "Cross-domain few-shot classification: meta-train on miniImageNet, meta-test on CUB (accuracy, %), "
        "DropGrad Table 4",
        "DropGrad Table 4 (CUB: Chen et al.'s novel classes, data set `cub` under $METAREG_DATA_ROOT)",
        tuple(runs),
        ("1-shot", "5-shot"),
        scale=100.0,
        pairs=pairs,
        note=_DROPGRAD_NOTE + " Dropout: rate 0.3 on the activations of every meta-training pass.",
    )


def _metaperturb_table_3(seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> Experiment:
    """MetaPerturb's ablations: each variant's phi meta-trained on Tiny ImageNet (stage 0), then
    transferred (ResNet20, the paper's schedule) to s-CIFAR100, Aircraft and CUB with the same
    options, 5 training seeds each (the paper: 5 meta-test runs)."""
    from .presets import _ABLATIONS

    targets = (("s-CIFAR100", "transfer-scifar100"), ("Aircraft", "transfer-aircraft"), ("CUB", "transfer-cub"))
    variants = [("Base", None, ("perturb.name=none",)), ("MetaPerturb", "perturb-tinyimagenet-resnet20", ())]
    for suffix, (label, options, _extra, _numbers) in _ABLATIONS.items():
        variants.append(
            (
                label,
                f"perturb-tinyimagenet-resnet20-{suffix}",
                (f"perturb.options={json.dumps(options)}",) if options else (),
            )
        )
    runs: list[Run] = []
    for label, source, overrides in variants:
        tag = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        if source is not None:
            runs.append(Run(f"phi-{tag}", source, row=f"phi {label}", command="meta-train", stage=0))
            overrides = (*overrides, f"perturb.phi={{out}}/phi-{tag}")
        for column, preset in targets:
            for seed in seeds:
                runs.append(
                    Run(
                        f"{tag}-{preset.removeprefix('transfer-')}-seed{seed}",
                        preset,
                        overrides,
                        row=label,
                        column=column,
                        seed=seed,
                        group=f"{label} {column}",
                        command="transfer",
                    )
                )
    rows = [label for label, _, _ in variants]
    return Experiment(
        "metaperturb-table-3",
        "MetaPerturb ablations (test accuracy, %), MetaPerturb Table 3",
        "MetaPerturb Table 3 (source Tiny ImageNet, ResNet20; targets s-CIFAR100, Aircraft, CUB)",
        tuple(runs),
        tuple(column for column, _ in targets),
        figure="seeds",
        pairs=tuple((row, "MetaPerturb") for row in rows if row != "MetaPerturb"),
        note="Paper numbers: mean +- std over 5 meta-test runs; ours over the same number of training seeds.",
    )


def _metaperturb_figure_8() -> Experiment:
    """The training loss surface of Base, Manifold Mixup and MetaPerturb networks on CUB (ResNet20,
    the shipped phi, one seed each), drawn as ``figure-8.png``."""
    rows = (("Base", ("perturb.name=none",)), ("Manifold Mixup", ("perturb.name=manifold-mixup",)), ("MetaPerturb", ()))
    runs = tuple(
        Run(
            f"cub-{label.lower().replace(' ', '-')}",
            "transfer-cub",
            overrides,
            row=label,
            column="CUB",
            command="transfer",
            group=label,
        )
        for label, overrides in rows
    )
    return Experiment(
        "metaperturb-figure-8",
        "Training loss surfaces on CUB, ResNet20 (MetaPerturb Figure 8) and the networks' test accuracy (%)",
        "MetaPerturb Figure 8 (filter-normalized directions, Li et al. 2018)",
        runs,
        ("CUB",),
        figure="loss-surface",
        pairs=(("MetaPerturb", "Base"), ("Manifold Mixup", "Base")),
    )


def _mtnet_table_6_3() -> Experiment:
    settings = (
        ("Omniglot 5-way 1-shot", "omniglot-5w1s"),
        ("Omniglot 20-way 1-shot", "omniglot-20w1s"),
        ("miniImageNet 5-way 1-shot", "miniimagenet-5w1s"),
    )
    runs = []
    for column, setting in settings:
        for label, suffix in (("MAML", ""), ("T-net", "-tnet"), ("MT-net", "-mtnet")):
            preset = f"mtnet-{setting}{suffix}"
            runs.append(_episodic_cell(preset.removeprefix("mtnet-"), preset, label, column, 1))
    return Experiment(
        "mtnet-table-6.3",
        "Few-shot classification accuracy (%), MT-net thesis Table 6.3",
        "MT-net thesis Table 6.3 (the MAML row quotes Finn et al.; ours is MAML run with the same settings)",
        tuple(runs),
        tuple(column for column, _ in settings),
        scale=100.0,
        pairs=(("T-net", "MAML"), ("MT-net", "MAML")),
        note="Settings of the MT-net code (meta-test with 3 / 5 / 10 inner steps); deviations in metareg.runs.presets.",
    )


EXPERIMENTS = {
    e.name: e
    for e in (
        _table_6_1(),
        _table_6_2(),
        _figure_6_1(),
        _dropgrad_figure_2(),
        _metadropout_table_1(),
        _metaperturb("miniimagenet", ("conv4", "resnet20")),
        _metaperturb("omniglot", ("resnet20",)),
        _metaperturb_finetuning(),
        _dropgrad_table_1(),
        _dropgrad_table_2(),
        _dropgrad_table_3(),
        _dropgrad_table_4(),
        _metaperturb_table_3(),
        _metaperturb_figure_8(),
        _mtnet_table_6_3(),
    )
}


# ------------------------------------------------------------------------------------- running
def _train(run: Run, folder: Path, iterations: int | None, log: Path, deadline: float | None = None) -> str:
    """Train one run to completion (resuming if it was started); returns "done", "diverged", or
    "unfinished" (stopped at the grid's ``deadline``, or not started before it)."""
    checkpoint = folder / "checkpoint.json"
    episodic = run.command == "train"
    command = ["train", "--no-test"] if episodic else ["perturb", run.command]
    cmd = [sys.executable, "-m", "metareg.cli", "--no-progress", *command, "--out", str(folder)]
    finished = folder / {"train": "checkpoint.json", "meta-train": "phi.json", "transfer": "test.json"}[run.command]
    if checkpoint.exists():
        meta = read_checkpoint_meta(checkpoint)[1]
        target = iterations or read_run(folder)[1].train.steps
        if meta["step"] >= target and finished.exists():
            return "done"
        cmd += ["--resume"]
    else:
        overrides = [o.replace("{out}", str(folder.parent)) for o in run.overrides]
        cmd += ["--preset", run.preset, *functools.reduce(operator.iadd, (["--set", o] for o in overrides), [])]
        if run.seed:
            cmd += ["--seed", str(run.seed)]
    if iterations:
        cmd += ["--steps", str(iterations)]
    if deadline is not None:
        remaining = int(deadline - time.monotonic())
        if remaining < 1:
            return "unfinished"
        cmd += ["--time-budget", str(remaining)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    start = log.stat().st_size if log.exists() else 0
    with log.open("a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)  # noqa: S603 (metareg itself)
    text = log.read_text()[start:]
    if done.returncode == 0:
        return "unfinished" if "time budget of" in text else "done"
    if DIVERGED.search(text):
        return "diverged"
    raise ConfigError(f"run {run.name} failed (exit {done.returncode}); see {log}")


def _test(run: Run, folder: Path, shot: int, episodes: int) -> dict[str, Any]:
    from ..fewshot import load_learner
    from .episodic import meta_test, save_result

    if run.command == "transfer":  # tested on its target's test images when it finished
        return read_result(folder / "test.json")

    path = folder / f"test-{shot}shot-{episodes}ep.json"
    if path.exists():
        return read_result(path)
    config, learner = load_learner(folder)
    result = meta_test(config, learner, episodes=episodes, shot=shot, progress=False)
    save_result(result, path)
    return result.to_dict()


def _fractions(folder: Path) -> dict[str, float]:
    from ..fewshot import load_learner
    from ..inner.mask import SubspaceMask

    _, learner = load_learner(folder)
    masks = [m for m in learner.modules() if isinstance(m, SubspaceMask)]
    return masks[0].update_fractions() if masks else {}


def run_experiment(
    name: str,
    out: str | Path,
    *,
    iterations: int | None = None,
    episodes: int = 1000,
    jobs: int = 2,
    progress: bool = True,
    deadline: float | None = None,
) -> Path:
    """Run (or continue) experiment ``name`` in folder ``out`` and write its report; past
    ``deadline`` (``time.monotonic()``) runs stop with checkpoints and the report marks them
    unfinished: running the experiment again continues them."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    require(16 * episodes, f"--episodes {episodes} (a score and an NLL per test episode)")
    out = Path(out)
    with run_lock(out):  # one grid per folder (each run's own folder is locked by the run itself)
        return _run_experiment(EXPERIMENTS[name], out, iterations, episodes, jobs, progress, deadline)


def _run_experiment(
    experiment: Experiment,
    out: Path,
    iterations: int | None,
    episodes: int,
    jobs: int,
    progress: bool,
    deadline: float | None,
) -> Path:
    name = experiment.name
    start = time.perf_counter()

    def one(run: Run) -> tuple[str, str]:
        status = _train(run, out / run.name, iterations, out / f"{run.name}.log", deadline)
        if progress:
            sys.stderr.write(
                f"[{time.perf_counter() - start:6.0f} s] {run.name}: {status}\n"
            )  # one write: no interleaving across jobs
            sys.stderr.flush()
        return run.name, status

    statuses: dict[str, str] = {}
    for stage in sorted({r.stage for r in experiment.runs}):  # transfers use the phi and source networks of stage 0
        runs = [r for r in experiment.runs if r.stage == stage]
        if stage > 0 and any(statuses[r.name] == "unfinished" for r in experiment.runs if r.stage < stage):
            statuses |= {r.name: "unfinished" for r in runs}  # their phi or source network is not ready
            continue
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            statuses |= dict(pool.map(one, runs))
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for run in experiment.runs:
        if statuses[run.name] == "done" and run.command != "meta-train" and run.stage > 0:
            results[run.name] = {shot: _test(run, out / run.name, shot, episodes) for shot in run.shots}
    if experiment.figure in ("seeds", "loss-surface"):
        report = _seed_table(experiment, statuses, results, iterations)
    else:
        report = _markdown(experiment, statuses, results, iterations, episodes)
    if experiment.note:
        report += f"\n{experiment.note}\n"
    if experiment.figure == "loss-surface":
        report += _loss_surfaces(experiment, statuses, out)
    if experiment.figure == "mask-fractions":
        fractions: dict[str, list[dict[str, float]]] = {}
        for run in experiment.runs:
            if statuses[run.name] == "done":
                fractions.setdefault(run.group, []).append(_fractions(out / run.name))
        stats = _fraction_stats(fractions)
        report += _fraction_table(stats)
        png = _plot_fractions(stats, out / "figure-6.1.png")
        report += f"\n![fractions]({png.name})\n" if png else "\n(matplotlib is not installed: no PNG)\n"
    unfinished = [name for name, status in statuses.items() if status == "unfinished"]
    if unfinished:
        report += (
            f"\n**Unfinished** (time budget): {', '.join(unfinished)}. Run `metareg reproduce {name} --out {out}` "
            "again to continue them from their checkpoints.\n"
        )
    path = out / f"{experiment.name}.md"
    path.write_text(report)
    return path


# ------------------------------------------------------------------------------------ reporting
def _cell(result: dict[str, Any] | None, status: str, scale: float = 1.0) -> str:
    if status == "diverged":
        return "diverged (NaN/Inf loss)"
    if status == "unfinished":
        return "unfinished"
    if result is None:
        return "-"
    return f"{result['mean'] * scale:.2f} +- {result['ci95'] * scale:.2f}"


def _loss_surfaces(experiment: Experiment, statuses: dict[str, str], out: Path) -> str:
    """MetaPerturb Figure 8: the finished runs' loss surfaces, drawn into ``figure-8.png``."""
    from .surface import run_loss_surface

    done = [run for run in experiment.runs if statuses[run.name] == "done"]
    if not done:
        return ""
    surfaces = [run_loss_surface(out / run.name) | {"label": run.row} for run in done]
    from ..viz.surface import flatness

    lines = [
        "",
        "Training loss along filter-normalized random directions (11 x 11 grid over [-1, 1]^2, 256 training "
        "images): mean loss increase over the grid (larger: sharper)",
        "",
    ]
    lines += [f"- {s['label']}: {flatness(s):.4f}" for s in surfaces]
    try:
        from ..viz.surface import plot_loss_surfaces

        png = plot_loss_surfaces(surfaces, out / "figure-8.png")
        lines.append(f"\n![loss surfaces]({png.name})")
    except ConfigError:
        lines.append("\n(matplotlib is not installed: no PNG)")
    return "\n".join(lines) + "\n"


def _markdown(
    experiment: Experiment, statuses: dict[str, str], results: dict, iterations: int | None, episodes: int
) -> str:
    from ..evaluate.stats import paired_difference

    schedule = f"{iterations} meta-iterations (reduced schedule)" if iterations else "the preset's full schedule"
    lines = [
        f"# {experiment.title}",
        "",
        f"Reproduces {experiment.source}. Ours: mean +- 95% CI over {episodes} test tasks "
        f"(fixed stream, seed 1234), {schedule}"
        + ("; paper in brackets." if any(r.paper for r in experiment.runs) else "."),
        "",
    ]
    by_row: dict[str, dict[str, str]] = {}
    for run in experiment.runs:
        if run.stage == 0:  # pre-training runs feed the others; they have no cell
            continue
        status = statuses[run.name]
        if experiment.figure is None and run.column:  # one run per cell, shot 10
            shot = run.shots[0]
            cell = _cell(results.get(run.name, {}).get(shot), status, experiment.scale)
            by_row.setdefault(run.row, {})[run.column] = cell + (f" [{run.paper[shot]}]" if shot in run.paper else "")
        else:  # one run per row, one column per shot
            for column, shot in zip(experiment.columns, run.shots):
                cell = _cell(results.get(run.name, {}).get(shot), status)
                by_row.setdefault(run.row, {})[column] = cell + (f" [{run.paper[shot]}]" if shot in run.paper else "")
    header = ["", *experiment.columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, cells in by_row.items():
        lines.append("| " + " | ".join([row, *(cells.get(c, "-") for c in experiment.columns)]) + " |")
    for a, b in experiment.pairs:  # paired differences on the same episodes
        differences = []
        for column in experiment.columns:
            one = [next((r for r in experiment.runs if r.row == row and r.column == column), None) for row in (a, b)]
            first, second = [results.get(r.name, {}).get(r.shots[0]) if r else None for r in one]
            if first is None or second is None:
                differences.append("-")
                continue
            d = paired_difference(first["scores"], second["scores"])
            differences.append(f"{d.mean * experiment.scale:+.2f} +- {d.ci95 * experiment.scale:.2f}")
        lines.append("| " + " | ".join([f"{a} - {b} (paired)", *differences]) + " |")
    return "\n".join(lines) + "\n"


def _seed_table(experiment: Experiment, statuses: dict[str, str], results: dict, iterations: int | None) -> str:
    """Transfer accuracies: per row and column mean +- std over seeds (and each seed's value), then
    the paired difference of the last column minus the first, per seed (with its 95% CI over the
    same test images) and over seeds."""
    import torch

    from ..evaluate.stats import paired_difference

    schedule = f"{iterations} training steps per run (reduced)" if iterations else "the presets' schedules"
    first = next(r for r in experiment.runs if r.command == "transfer" and r.stage > 0)
    test = results.get(first.name, {}).get(first.shots[0], {}).get("protocol", {})
    lines = [
        f"# {experiment.title}",
        "",
        f"{experiment.source}. Test accuracy in % on the same {test.get('test_images', '?')} test "
        f"images for every run, mean +- std over training seeds (each seed's value in brackets); {schedule}. "
        "Paired differences: per seed over the same test images (95% CI), and mean +- std over seeds.",
        "",
    ]
    cells: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    for run in experiment.runs:
        if run.command == "transfer" and run.stage > 0:
            if statuses[run.name] == "diverged":
                cells.setdefault((run.row, run.column), []).append((run.seed, {}))
            elif run.name in results:
                cells.setdefault((run.row, run.column), []).append((run.seed, results[run.name][run.shots[0]]))
    rows = list(dict.fromkeys(r.row for r in experiment.runs if r.command == "transfer" and r.stage > 0))
    if experiment.pairs:  # rows compared with rows, per column
        return "\n".join(lines + _seed_rows(experiment, cells, rows)) + "\n"
    lines += [
        "| backbone | " + " | ".join(experiment.columns) + f" | {experiment.columns[-1]} - {experiment.columns[0]} |",
        "|" + "---|" * (len(experiment.columns) + 2),
    ]
    for row in rows:
        row_cells = []
        for column in experiment.columns:
            values = [100 * r["mean"] for _, r in cells.get((row, column), []) if r]
            row_cells.append(_mean_std(values) + " [" + ", ".join(f"{v:.2f}" for v in values) + "]" if values else "-")
        a, b = dict(cells.get((row, experiment.columns[-1]), [])), dict(cells.get((row, experiment.columns[0]), []))
        diffs = [
            paired_difference(torch.tensor(a[s]["scores"]), torch.tensor(b[s]["scores"]))
            for s in sorted(set(a) & set(b))
            if a[s] and b[s]
        ]
        per_seed = ", ".join(f"{100 * d.mean:+.2f} +- {100 * d.ci95:.2f}" for d in diffs)
        row_cells.append(f"{_mean_std([100 * d.mean for d in diffs], sign=True)} [{per_seed}]" if diffs else "-")
        lines.append(f"| {row} | " + " | ".join(row_cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_rows(experiment: Experiment, cells: dict, rows: list[str]) -> list[str]:
    """One row per variant (mean +- std over seeds, the paper's number in brackets where a run names
    one), then each pair's paired difference A - B per column: per seed over the same test images
    and mean +- std over seeds."""
    import torch

    from ..evaluate.stats import paired_difference
    from .presets import PRESETS

    lines = ["| | " + " | ".join(experiment.columns) + " |", "|" + "---|" * (len(experiment.columns) + 1)]
    for row in rows:
        row_cells = []
        for column in experiment.columns:
            values = [100 * r["mean"] for _, r in cells.get((row, column), []) if r]
            row_cells.append(_mean_std(values) if values else "-")
        lines.append(f"| {row} | " + " | ".join(row_cells) + " |")
    for a, b in experiment.pairs:
        row_cells = []
        for column in experiment.columns:
            first, second = dict(cells.get((a, column), [])), dict(cells.get((b, column), []))
            diffs = [
                paired_difference(torch.tensor(first[s]["scores"]), torch.tensor(second[s]["scores"]))
                for s in sorted(set(first) & set(second))
                if first[s] and second[s]
            ]
            row_cells.append(_mean_std([100 * d.mean for d in diffs], sign=True) if diffs else "-")
        lines.append(f"| {a} - {b} (paired, per seed) | " + " | ".join(row_cells) + " |")
    papers = {p.paper for run in experiment.runs if run.stage == 0 and (p := PRESETS.get(run.preset))}
    if papers:
        lines += ["", "The paper's numbers: " + "; ".join(sorted(papers))]
    return lines


def _mean_std(values: list[float], sign: bool = False) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.2f} +- {spread:.2f}" if sign else f"{mean:.2f} +- {spread:.2f}"


def _fraction_stats(
    fractions: dict[str, list[dict[str, float]]],
) -> dict[str, tuple[int, dict[str, tuple[float, float]]]]:
    """Per group: (number of runs, each layer's fraction as (mean, std) over the group's runs)."""
    return {
        group: (
            len(runs),
            {
                k: (
                    statistics.fmean(r[k] for r in runs),
                    statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0,
                )
                for k in runs[0]
            },
        )
        for group, runs in fractions.items()
    }


def _fraction_table(stats: dict[str, tuple[int, dict[str, tuple[float, float]]]]) -> str:
    """One row per group: each layer's fraction (and "all" logits) as mean +- std over the group's runs."""
    if not stats:
        return ""
    layers = list(next(iter(stats.values()))[1])
    lines = [
        "",
        "Fraction of weights a task changes, e^zeta / (e^zeta + 1) averaged over each layer's logits and "
        "over all logits (mean +- std over meta-training seeds):",
        "",
        "| | runs | " + " | ".join(layers) + " |",
        "|" + "---|" * (len(layers) + 2),
    ]
    for group, (n, layer_stats) in stats.items():
        lines.append(f"| {group} | {n} | " + " | ".join(f"{m:.3f} +- {s:.3f}" for m, s in layer_stats.values()) + " |")
    return "\n".join(lines) + "\n"


def _plot_fractions(stats: dict[str, tuple[int, dict[str, tuple[float, float]]]], path: Path) -> Path | None:
    from ..viz.backend import pyplot

    try:
        plt = pyplot()
    except ConfigError:
        return None
    if not stats:
        return None
    layers = list(next(iter(stats.values()))[1])
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    width = 0.8 / len(stats)
    for i, (group, (n, layer_stats)) in enumerate(stats.items()):
        ax.bar(
            [j + i * width for j in range(len(layers))],
            [m for m, _ in layer_stats.values()],
            width,
            yerr=[s for _, s in layer_stats.values()] if n > 1 else None,
            capsize=3,
            label=group,
        )
    ax.set_xticks(
        [j + width * (len(stats) - 1) / 2 for j in range(len(layers))],
        [k.removesuffix(".weight") if k != "all" else "all logits" for k in layers],
    )
    ax.set_ylabel("fraction of weights changed")
    ax.set_ylim(0, 1.05)
    ax.set_title("MT-net, 10-shot polynomial regression (mean +- std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _done_and_rate(folder: Path) -> tuple[int, float | None]:
    """A run's finished iterations and its measured seconds per iteration (from its log), if started."""
    import csv

    checkpoint, log = folder / "checkpoint.json", folder / "log.csv"
    done = read_checkpoint_meta(checkpoint)[1]["step"] if checkpoint.exists() else 0
    if not log.exists():
        return done, None
    with log.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") and r.get("seconds")]
    try:
        seconds, step = float(rows[-1]["seconds"]), int(rows[-1]["step"])
    except (IndexError, ValueError):  # no row yet, or a log cut mid-line
        return done, None
    return done, (seconds / step if seconds > 0 and step > 0 else None)


def plan(name: str, out: str | Path) -> str:
    """What is left of experiment ``name`` in folder ``out``: each run's progress and the time it
    still needs on this machine (the run's own measured rate once it has started, else the rate
    measured for its preset, :mod:`metareg.runs.costs`) and on a GPU (an estimate from counted
    FLOPs, labelled as such), and the command that continues the grid in chunks."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    from .costs import MACHINE, MEASURED, gpu_seconds, hours
    from .presets import get_preset

    out = Path(out)
    lines = [f"{name}: {len(EXPERIMENTS[name].runs)} runs in {out}"]
    left = gpu_left = 0.0
    unknown = []
    for run in EXPERIMENTS[name].runs:
        preset = get_preset(run.preset)
        total = preset.values["train"]["steps"]
        done, rate = _done_and_rate(out / run.name)
        timing = MEASURED.get(preset.timing)
        source = "its log" if rate is not None else f"measured for {preset.timing}" if timing else None
        rate = rate if rate is not None else (timing.cpu_seconds if timing else None)
        remaining = max(total - done, 0)
        if rate is None:
            unknown.append(run.name)
            when = ", not timed"
        else:
            left += remaining * rate
            when = f", {rate:.2f} s/iteration ({source}): {hours(remaining * rate)} left"
        if timing is not None:
            gpu_left += remaining * gpu_seconds(timing)
            when += f", ~{hours(remaining * gpu_seconds(timing))} on a GPU (estimate)"
        lines.append(f"  {run.name:<40} {done:>7} / {total} iterations{when}")
    timed = len(unknown) < len(EXPERIMENTS[name].runs)
    lines.append(
        (
            f"time left on {MACHINE}: {hours(left)} at the measured rates"
            if timed
            else f"time left on {MACHINE}: unknown"
        )
        + (f" (not timed, not counted: {', '.join(unknown)})" if unknown else "")
    )
    lines.append(
        f"time left on one GPU: ~{hours(gpu_left)} (an ESTIMATE, not a measurement: FLOPs counted on the CPU at an "
        "assumed throughput, see metareg.runs.costs)"
        if gpu_left or timed
        else "time left on one GPU: unknown (no run of this grid has a counted cost)"
    )
    lines.append(f"continue in chunks with: metareg reproduce {name} --out {out} --time-budget SECONDS")
    return "\n".join(lines)
