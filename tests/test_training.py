"""Meta-training runs: exact resume, atomic checkpoints, divergence, corrupt checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, assert_same_tensors, final_params, flags, tiny
from metareg.checkpoint import load_checkpoint
from metareg.errors import CheckpointError, ConfigError, DivergenceError
from metareg.fewshot import load_learner
from metareg.runs.episodic import meta_test, train

pytestmark = pytest.mark.slow  # every test here trains or tests runs, or starts processes


def test_resume_continues_exactly(tmp_path):
    train(tiny("train.steps=6", "train.checkpoint_every=3"), tmp_path / "straight", progress=False)
    train(tiny("train.steps=3", "train.checkpoint_every=3"), tmp_path / "split", progress=False)
    config = tiny("train.steps=6", "train.checkpoint_every=3")
    train(config, tmp_path / "split", resume=True, progress=False)
    assert_same_tensors(final_params(tmp_path / "straight"), final_params(tmp_path / "split"))
    rows = (tmp_path / "split" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "3", "4", "6"]


def test_run_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    """A real SIGKILL while training: resuming ends with the weights of an uninterrupted run."""
    common = [
        "--preset",
        "quickstart",
        "--no-test",
        "--iterations",
        "40",
        *flags([*TINY, "train.checkpoint_every=5"]),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "metareg.cli", "--no-progress", "train"]
    subprocess.run([*cli, *common, "--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        [*cli, *common, "--out", str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed" / "checkpoint.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 10):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(checkpoint.read_text())["step"]
    assert 10 <= step < 40, "the run was not killed mid-training"
    subprocess.run([*cli, "--out", str(tmp_path / "killed"), "--resume"], check=True, env=env, capture_output=True)
    assert_same_tensors(final_params(tmp_path / "straight"), final_params(tmp_path / "killed"))


def test_checkpoint_holds_no_pickles_and_roundtrips(tmp_path):
    config = tiny("train.steps=2")
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
    train(tiny("train.steps=1"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(tiny("train.steps=1"), tmp_path, progress=False)


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    train(tiny("train.steps=1"), tmp_path / "run", progress=False)
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
    train(tiny("train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    good = final_params(run)
    config = tiny("train.steps=8", "train.checkpoint_every=2", "inner.lr=1e30", "train.clip=null")
    with pytest.raises(DivergenceError, match="last good checkpoint"):
        train(config, run, resume=True, progress=False)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2
    assert_same_tensors(good, final_params(run))


def record_test_episodes(learner) -> Callable[[], list[tuple[torch.Tensor, ...]]]:
    """Wrap ``learner`` so that every episode it is tested on is recorded; the returned function gives
    them as (support x, support y, query x, query y), in the order the learner received them."""
    seen: dict[str, list] = {"support": [], "query_x": [], "query_y": []}
    adapt, forward, score = learner.adapt_for_test, learner.query_forward, learner.score

    def adapt_for_test(start, x, y, **kw):
        seen["support"].append((x.clone(), y.clone()))
        return adapt(start, x, y, **kw)

    def query_forward(params, x, *args, **kw):
        seen["query_x"].append(x.clone())
        return forward(params, x, *args, **kw)

    def score_of(out, y):
        seen["query_y"].append(y.clone())
        return score(out, y)

    learner.adapt_for_test, learner.query_forward, learner.score = adapt_for_test, query_forward, score_of

    def episodes():
        assert len(seen["support"]) == len(seen["query_x"]) == len(seen["query_y"])
        return [(*s, qx, qy) for s, qx, qy in zip(seen["support"], seen["query_x"], seen["query_y"])]

    return episodes


def test_same_test_episodes_for_every_model(tmp_path):
    """Two different models (other training seed and length) are tested on the very same episodes:
    the support and query sets each learner receives are identical, while their scores differ."""
    configs = [tiny("train.steps=1"), tiny("train.steps=2", "seed=7")]
    results, episodes = [], []
    for i, config in enumerate(configs):
        learner = train(config, tmp_path / str(i), progress=False).learner
        seen = record_test_episodes(learner)
        results.append(meta_test(config, learner, progress=False))
        episodes.append(seen())
    a, b = episodes
    assert len(a) == len(b) == 6 and results[0].scores.numel() == 6
    for ea, eb in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(ea, eb))
    assert len({e[0].numpy().tobytes() for e in a}) == 6  # six different episodes, not one repeated
    assert results[0].protocol == results[1].protocol
    assert not torch.equal(results[0].scores, results[1].scores)  # two different models
    # The same model tested twice: the same scores (evaluation noise and episodes are fixed).
    assert torch.equal(meta_test(configs[1], learner, progress=False).scores, results[1].scores)
