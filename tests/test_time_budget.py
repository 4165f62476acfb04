"""Time budgets (``--time-budget``): a run stops at the first step past its deadline with a
checkpoint and says where it stopped; resumed, it ends with the tensors of an uninterrupted run,
in every scheme (bilevel, joint meta-training, transfer, hyperparameter selection, the Base run of
``--against-base``) and across processes."""

from __future__ import annotations

import os
import time

import pytest

from helpers import (
    META_TRAIN_KEYS,
    TINY,
    TRANSFER_KEYS,
    assert_same_tensors,
    final_params,
    flags,
    meta_config,
    tensors_of,
    tiny,
    tiny_transfer,
)
from metareg import cli
from metareg.runs.episodic import train
from metareg.runs.metaperturb import meta_train
from metareg.runs.transfer import transfer


def test_a_time_budget_stops_with_a_checkpoint_and_the_resumed_run_ends_identical(tmp_path):
    config = tiny("train.iterations=6", "train.checkpoint_every=3")
    train(config, tmp_path / "straight", progress=False)
    stopped = train(config, tmp_path / "budget", progress=False, deadline=time.monotonic())  # already out of time
    assert not stopped.finished and stopped.step == 1
    finished = train(config, tmp_path / "budget", resume=True, progress=False)
    assert finished.finished and finished.step == 6
    assert_same_tensors(final_params(tmp_path / "straight"), final_params(tmp_path / "budget"))


def test_time_budget_on_the_command_line(tmp_path, capsys):
    status = cli.main(
        [
            "--no-progress",
            "train",
            "--out",
            str(tmp_path / "run"),
            "--iterations",
            "50",
            "--time-budget",
            "1",
            *flags(TINY),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0 and "time budget of 1 s reached: stopped at step" in out and "--resume --time-budget 1" in out
    assert not (tmp_path / "run" / "test.json").exists()


def test_a_time_budget_during_hyperparameter_selection_says_where_it_stopped(tmp_path, capsys):
    status = cli.main(
        [
            "--no-progress",
            "perturb",
            "transfer",
            "--perturbation",
            "manifold-mixup",
            "--select",
            "--out",
            str(tmp_path / "sel"),
            "--time-budget",
            "1",
            *flags(["optim.steps=40", "optim.checkpoint_every=5", "data.image_size=16", "model.options.channels=8"]),
        ]
    )
    out = capsys.readouterr().out
    # the stop falls in one of the candidates' runs (which one depends on the machine's speed)
    assert status == 0 and f"(in {tmp_path / 'sel' / 'selection'}{os.sep}" in out and "stopped at step" in out


@pytest.mark.parametrize("kind", ["meta-train", "transfer"])
def test_a_time_budget_stops_ordinary_training_and_the_resumed_run_ends_identical(tmp_path, kind):
    """`metareg perturb meta-train / transfer --time-budget`: stop at the first step with a
    checkpoint, no result yet; resumed, the run ends with the uninterrupted run's tensors."""
    if kind == "meta-train":
        start, config, keys, result = meta_train, meta_config(), META_TRAIN_KEYS, "phi.json"
    else:
        start, config, keys, result = transfer, tiny_transfer(), TRANSFER_KEYS, "test.json"
    start(config, tmp_path / "whole", progress=False)
    stopped = start(config, tmp_path / "budget", progress=False, deadline=time.monotonic())  # already out of time
    assert not (tmp_path / "budget" / result).exists() and (tmp_path / "budget" / "checkpoint.json").exists()
    if kind == "transfer":
        assert stopped is None
    else:
        assert not stopped.finished
    start(config, tmp_path / "budget", resume=True, progress=False)
    assert (tmp_path / "budget" / result).exists()
    assert_same_tensors(tensors_of(tmp_path / "whole"), tensors_of(tmp_path / "budget"), keys)
