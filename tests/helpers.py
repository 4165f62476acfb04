"""Builders and checks shared by the tests (test modules import from here, never from each other)."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from metareg.checkpoint import load_checkpoint
from metareg.config import MetaTrainConfig, TransferConfig, parse_assignment
from metareg.data.tasks import TaskBatch
from metareg.inner import build_inner_rule
from metareg.meta import BilevelLearner, select_fast
from metareg.nets import MLP, ConvNet
from metareg.runs.common import resolve

REPO = Path(__file__).resolve().parents[1]
# The shared data folder (Omniglot, miniImageNet): $METAREG_SHARED_DATA or ../shared/data; tests that
# need it skip when it is absent.
SHARED = (
    Path(os.environ["METAREG_SHARED_DATA"])
    if os.environ.get("METAREG_SHARED_DATA")
    else REPO.parent / "shared" / "data"
)


# ---------------------------------------------------------------------------------- tensors
def random_image_batch(tasks=2, way=3, shot=1, query=2, channels=1, size=8, dtype=torch.float64, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(tasks, n, channels, size, size, generator=g, dtype=dtype)

    def labels(k):
        return torch.stack([torch.randperm(way, generator=g).repeat_interleave(k) for _ in range(tasks)])

    return TaskBatch(images(way * shot), labels(shot), images(way * query), labels(query))


def random_regression_batch(tasks=3, shot=5, query=4, dtype=torch.float64, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, shot + query, 1, generator=g, dtype=dtype) * 10 - 5
    amp = torch.rand(tasks, 1, 1, generator=g, dtype=dtype) * 4 + 0.5
    y = amp * torch.sin(x)
    return TaskBatch(x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:])


def tiny_conv(way=3, channels=4, size=8, depth=2, dtype=torch.float64, seed=0, **kw) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(way, 1, size, channels=channels, depth=depth, **kw).to(dtype)


def learner_for(model, *, lr=0.1, steps=2, step="sgd", task="classification", transforms=None, **kw) -> BilevelLearner:
    params = dict(model.named_parameters())
    fast = {n: params[n] for n in select_fast(model, kw.get("fast", ["*"]))}
    rule = build_inner_rule(fast, step=step, lr=lr, steps=steps, transforms=transforms, groups=model.layer_groups()).to(
        next(model.parameters()).dtype
    )
    return BilevelLearner(model, rule, task=task, inner_steps=steps, **kw)


def tiny_mlp(hidden=(6, 6), dtype=torch.float64, seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 1, hidden).to(dtype)


# -------------------------------------------------------------------------- tiny run configs
TINY = [  # the quickstart (bilevel, glyphs) at a size a test trains in a second
    "data.options={num_classes: 30}",
    "data.way=3",
    "data.query=2",
    "model.options={channels: 4}",
    "inner.steps=2",
    "train.meta_batch=2",
    "train.log_every=2",
    "train.val_every=4",
    "train.val_episodes=4",
    "eval.episodes=6",
]
TINY_META = [  # MetaPerturb's joint meta-training (perturb-quickstart)
    "data.options.num_classes=20",
    "data.classes=20",
    "data.image_size=16",
    "train.batch_size=4",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "model.options.channels=8",
    "tasks=4",
]
TINY_TRANSFER = [  # transfer-quickstart
    "data.image_size=16",
    "train.batch_size=8",
    "train.steps=6",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "model.options.channels=8",
    "perturb.mc_samples=3",
]


def flags(assignments: list[str]) -> list[str]:
    """``--set KEY=VALUE`` command-line flags for config assignments."""
    return [part for a in assignments for part in ("--set", a)]


def tiny(*extra: str):
    return resolve("quickstart", None, [parse_assignment(s) for s in [*TINY, *extra]])


def meta_config(*extra: str) -> MetaTrainConfig:
    return resolve(
        "perturb-quickstart", overrides=[parse_assignment(s) for s in (*TINY_META, *extra)], schema=MetaTrainConfig
    )


def tiny_transfer(*extra: str) -> TransferConfig:
    return resolve(
        "transfer-quickstart", overrides=[parse_assignment(s) for s in (*TINY_TRANSFER, *extra)], schema=TransferConfig
    )


# ------------------------------------------------------------------------------- checkpoints
# What a checkpoint must hold (glob patterns of tensor names): a comparison passes vacuously on less.
EPISODIC_KEYS = ("param.*", "optim.state.*.exp_avg", "optim.state.*.exp_avg_sq")
META_TRAIN_KEYS = (
    "phi.*",
    "optim.phi.state.*",
    *(f"task{t}.*" for t in range(4)),
    *(f"optim.task{t}.*" for t in range(4)),
)
TRANSFER_KEYS = ("model.*", "optim.state.*")


def final_params(run: Path) -> dict[str, torch.Tensor]:
    """An episodic run's checkpointed learner parameters and meta-optimizer state."""
    tensors, _ = load_checkpoint(run)
    return {k: v for k, v in tensors.items() if k.startswith(("param.", "optim."))}


def tensors_of(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's current checkpoint."""
    return load_file(str(run / json.loads((run / "checkpoint.json").read_text())["tensors"]))


def assert_holds(tensors: dict[str, torch.Tensor], patterns: tuple[str, ...]) -> None:
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in tensors)]
    assert not missing, f"no {missing} among {sorted(tensors)[:10]}..."


def assert_same_tensors(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    holds: tuple[str, ...] = EPISODIC_KEYS,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """Two checkpoints hold the same tensor names, among them every pattern of ``holds`` (so an empty
    or partial comparison cannot pass), with the same values: bit for bit by default, or within
    ``rtol``/``atol`` (runs whose sums are ordered differently, e.g. across processes)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    assert_holds(a, holds)
    for key in a:
        if rtol == atol == 0.0:
            assert torch.equal(a[key], b[key]), (key, (a[key].double() - b[key].double()).abs().max())
        else:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


# -------------------------------------------------------------------------------- command line
def cli_subprocess(*args: str, cwd=None, processes: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """``metareg --no-progress ARGS`` in a fresh process (one thread each), output captured; with
    ``processes`` > 1 under ``torchrun --standalone`` (gloo on the CPU)."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    )
    return subprocess.run(
        [sys.executable, *launcher, "-m", "metareg.cli", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}),
        timeout=300,
    )


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """``metareg --no-progress ARGS`` in this process: (exit status, stderr)."""
    from metareg import cli

    status = cli.main(["--no-progress", *args])
    return status, capsys.readouterr().err


def assert_one_line(status: int, stderr: str, *fragments: str) -> None:
    """A user error: exit status 2 and one line on stderr (besides the 'run folder' notice), no
    traceback, holding every fragment."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("run folder")]
    assert status == 2, stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------ data files
def write_tiny_mini(root: Path, counts: dict[str, int], size: tuple[int, int] = (84, 84)) -> Path:
    """Ravi & Larochelle layout: images/<label><index>.jpg and train/val/test csvs (all classes in train)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["filename,label"]
    for label, n in counts.items():
        for i in range(n):
            name = f"{label}{i + 1:08d}.jpg"
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name, quality=90)
            lines.append(f"{name},{label}")
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root
