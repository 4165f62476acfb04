"""The runs that accumulate across GPU windows (``gpu-runs/``, ``benchmarks/gpu_runs.py``): which
copy continues, how a window's time is shared, how a window's runs come home, and that every
committed run folder resumes exactly on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import tiny
from metareg import cli
from metareg.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"


def gpu_runs_module():
    spec = importlib.util.spec_from_file_location("gpu_runs", ROOT / "benchmarks" / "gpu_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_runs"] = module  # (a dataclass looks its module up)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, steps: int) -> Path:
    """A tiny run folder standing for a GPU run at step ``steps``."""
    from metareg.runs.episodic import train

    train(tiny(f"train.steps={steps}", f"train.checkpoint_every={steps}"), folder, progress=False)
    return folder


def test_the_furthest_copy_continues_and_the_time_is_shared_by_unfinished_runs(tmp_path):
    g = gpu_runs_module()
    name = g.ORDER[0].name
    fake_run(tmp_path / "repo" / name, 1)
    fake_run(tmp_path / "shared" / name, 2)
    assert g.furthest(name, (tmp_path / "repo", tmp_path / "shared")) == tmp_path / "shared" / name
    assert g.furthest("nothing", (tmp_path / "repo",)) is None
    work = tmp_path / "work"
    assert g.budgets(300, work) == [(run.name, 300 // len(g.ORDER)) for run in g.ORDER]
    assert g.budgets(0, work) == []


def test_a_windows_runs_come_home_only_when_further_along(tmp_path):
    """``collect`` replaces a committed run only by a copy at a later step, records GPU time and
    machines in the README table; a tar cannot write outside the runs folder."""
    g = gpu_runs_module()
    name = g.ORDER[0].name
    window = tmp_path / "window"
    fake_run(window / name, 2)
    g.record(window, name, 90.0, "NVIDIA H200")
    g.record(window, name, 30.0, "NVIDIA H200")
    tar = tmp_path / "gpu-runs.tar.gz"
    with tarfile.open(tar, "w:gz") as archive:
        archive.add(window, arcname=".")
    home = tmp_path / "gpu-runs"
    fake_run(home / name, 1)
    g.collect(tar, home)
    assert g.step_of(home / name) == 2
    table = (home / "README.md").read_text()
    assert f"| `{name}` |" in table and "| 2 / 60000 | 2.0 | NVIDIA H200 |" in table
    behind = tmp_path / "behind"
    fake_run(behind / name, 1)
    with tarfile.open(tar, "w:gz") as archive:
        archive.add(behind, arcname=".")
    g.collect(tar, home)
    assert g.step_of(home / name) == 2  # a copy behind never replaces one further along


def committed_runs() -> list[Path]:
    folder = ROOT / "gpu-runs"
    return sorted(p for p in folder.iterdir() if (p / "checkpoint.json").is_file()) if folder.is_dir() else []


def resume_one_cpu_step(run: Path, tmp_path: Path, data_root: Path | None) -> None:
    """Load a run folder (a copy), check its step and finite weights, and take one more CPU step."""
    copy = tmp_path / run.name
    import shutil

    shutil.copytree(run, copy)
    tensors, meta = load_checkpoint(copy)
    step = meta["step"]
    assert isinstance(step, int) and step >= 0
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("param.") and t.is_floating_point())
    flags = ["--data-root", str(data_root)] if data_root else []
    args = ["--no-progress", "train", "--out", str(copy), "--resume", "--steps", str(step + 1), "--device", "cpu"]
    assert cli.main([*args, *flags, "--no-test"]) == 0
    assert json.loads((copy / "checkpoint.json").read_text())["step"] == step + 1
    after, _ = load_checkpoint(copy)
    assert all(math.isfinite(float(t.abs().sum())) for k, t in after.items() if k.startswith("param."))


@pytest.mark.parametrize("run", committed_runs(), ids=lambda p: p.name)
def test_every_committed_gpu_run_resumes_on_the_cpu(run, tmp_path):
    if not SHARED_OMNIGLOT.is_dir():
        pytest.skip("../shared/data/omniglot is absent: the committed runs train on Omniglot")
    resume_one_cpu_step(run, tmp_path, SHARED_OMNIGLOT)


def test_a_run_brought_home_from_a_window_resumes_on_the_cpu(tmp_path):
    """The whole road without a GPU: a window's run, packed, collected, resumed one CPU step."""
    g = gpu_runs_module()
    window = tmp_path / "window"
    fake_run(window / g.ORDER[0].name, 2)
    tar = tmp_path / "gpu-runs.tar.gz"
    with tarfile.open(tar, "w:gz") as archive:
        archive.add(window, arcname=".")
    home = tmp_path / "gpu-runs"
    g.collect(tar, home)
    resume_one_cpu_step(home / g.ORDER[0].name, tmp_path / "resumed", None)
