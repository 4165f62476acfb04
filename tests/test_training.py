"""Meta-training runs: exact resume, atomic checkpoints, divergence, corrupt checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metareg.checkpoint import load_checkpoint
from metareg.config import parse_assignment, resolve
from metareg.errors import CheckpointError, ConfigError, DivergenceError
from metareg.experiment import load_learner, meta_test, train

TINY = [
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


def tiny(*extra: str):
    return resolve("quickstart", None, [parse_assignment(s) for s in [*TINY, *extra]])


def final_params(run: Path) -> dict:
    tensors, _ = load_checkpoint(run)
    return {k: v for k, v in tensors.items() if k.startswith(("param.", "optim."))}


def test_resume_continues_exactly(tmp_path):
    train(tiny("train.iterations=6", "train.checkpoint_every=3"), tmp_path / "straight", progress=False)
    train(tiny("train.iterations=3", "train.checkpoint_every=3"), tmp_path / "split", progress=False)
    config = tiny("train.iterations=6", "train.checkpoint_every=3")
    train(config, tmp_path / "split", resume=True, progress=False)
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "split" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "3", "4", "6"]


def test_run_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    """A real SIGKILL while training: resuming ends with the weights of an uninterrupted run."""
    common = ["--preset", "quickstart", "--no-test", "--iterations", "40", *sum((["--set", s] for s in [*TINY, "train.checkpoint_every=5"]), [])]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "metareg.cli", "--no-progress", "train"]
    subprocess.run([*cli, *common, "--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cli, *common, "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 10):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(checkpoint.read_text())["step"]
    assert 10 <= step < 40, "the run was not killed mid-training"
    subprocess.run([*cli, "--out", str(tmp_path / "killed"), "--resume"], check=True, env=env, capture_output=True)
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_no_pickles_and_roundtrips(tmp_path):
    config = tiny("train.iterations=2")
    trainer = train(config, tmp_path, progress=False)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["config"]["data"]["way"] == 3
    tensors = load_file(str(tmp_path / meta["tensors"]))
    assert "rng.torch" in tensors and "rng.episodes" in tensors
    _, learner = load_learner(tmp_path)
    for name, p in trainer.learner.state_dict().items():
        assert torch.equal(learner.state_dict()[name], p)
    assert len(list(tmp_path.glob("checkpoint-*.safetensors"))) == 1  # old tensor files are removed


def test_fresh_run_refuses_to_overwrite(tmp_path):
    train(tiny("train.iterations=1"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(tiny("train.iterations=1"), tmp_path, progress=False)


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    train(tiny("train.iterations=1"), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoint.json").read_text())
    tensor_file = run / meta["tensors"]
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_learner(run)
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a metareg checkpoint"):
        load_checkpoint(tmp_path / "foreign.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.json")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.iterations=2", "train.checkpoint_every=2"), run, progress=False)
    good = final_params(run)
    config = tiny("train.iterations=8", "train.checkpoint_every=2", "inner.lr=1e30", "train.clip=null")
    with pytest.raises(DivergenceError, match="last good checkpoint"):
        train(config, run, resume=True, progress=False)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2
    after = final_params(run)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_same_test_episodes_for_every_model(tmp_path):
    config = tiny("train.iterations=1")
    t1 = train(config, tmp_path / "a", progress=False)
    r1 = meta_test(config, t1.learner, progress=False)
    r2 = meta_test(config, t1.learner, progress=False)
    assert torch.equal(r1.scores, r2.scores) and r1.protocol == r2.protocol
    assert r1.scores.numel() == 6
