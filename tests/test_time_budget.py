"""Time budgets (``--time-budget``): a run stops at the first step past its deadline with a
checkpoint and says where it stopped; resumed, it ends with the tensors of an uninterrupted run,
in every scheme (bilevel, joint meta-training, transfer, hyperparameter selection, the Base run of
``--against-base``) and across processes."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import (
    META_TRAIN_KEYS,
    TINY,
    TINY_TRANSFER,
    TRANSFER_KEYS,
    assert_same_tensors,
    cli_subprocess,
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

pytestmark = pytest.mark.slow  # every test here trains or tests runs, or starts processes


def test_a_time_budget_stops_with_a_checkpoint_and_the_resumed_run_ends_identical(tmp_path):
    config = tiny("train.steps=6", "train.checkpoint_every=3")
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
            *flags(["train.steps=40", "train.checkpoint_every=5", "data.image_size=16", "model.options.channels=8"]),
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


def test_a_time_budget_stops_both_torchrun_processes_together_and_the_run_resumes_exactly(tmp_path):
    """`torchrun --nproc_per_node 2 metareg train --time-budget 1`: the budget counts from the
    command's start, so it is spent by the end of the first steps (starting torch takes about that);
    both processes stop at the same step with one checkpoint (of 2 processes) and one message, and
    the run resumed with 2 processes ends bit-identical to an uninterrupted one-process run (float64,
    loop strategy). Under 30 s on 2 cores."""
    common = [*flags([*TINY, "dtype=float64", "train.checkpoint_every=1", "train.val_every=1000"]), "--no-test"]
    done = cli_subprocess("train", *common, "--iterations", "4", "--out", str(tmp_path / "straight"))
    assert done.returncode == 0, done.stderr
    budget = tmp_path / "budget"
    cut = [*common, "--iterations", "4", "--out", str(budget), "--time-budget", "1"]
    done = cli_subprocess("train", *cut, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    stop = json.loads((budget / "checkpoint.json").read_text())
    assert stop["processes"] == 2 and 1 <= stop["step"] < 4
    assert done.stdout.count(f"stopped at step {stop['step']} of 4") == 1  # said once, by the first process
    done = cli_subprocess("train", "--out", str(budget), "--resume", "--iterations", "4", "--no-test", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((budget / "checkpoint.json").read_text())["step"] == 4
    assert_same_tensors(final_params(tmp_path / "straight"), final_params(budget))


def test_a_time_budget_inside_the_base_run_of_against_base_says_where_and_resumes(tmp_path, capsys, monkeypatch):
    """`metareg perturb transfer --against-base --time-budget S` whose budget runs out in the Base
    run (after the perturbed run finished): one line names the Base run's folder and step, no
    comparison is printed; `--resume` finishes the Base run, bit-identical to an uninterrupted one,
    and prints the paired difference of the uninterrupted pair."""
    from metareg.runs import transfer as transfer_module

    real_fit = transfer_module.fit
    out = tmp_path / "mp"

    def fit(config, train, test, folder, **kw):  # the budget is spent when the Base run starts
        if folder == transfer_module.base_run(out):
            kw["deadline"] = time.monotonic()
        return real_fit(config, train, test, folder, **kw)

    args = ["--no-progress", "perturb", "transfer", *flags(TINY_TRANSFER), "--against-base"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = capsys.readouterr().out
    monkeypatch.setattr(transfer_module, "fit", fit)
    assert cli.main([*args, "--out", str(out), "--time-budget", "3600"]) == 0
    printed = capsys.readouterr().out
    assert (out / "test.json").is_file() and not (tmp_path / "mp-base" / "test.json").exists()
    assert f"(in {tmp_path / 'mp-base'})" in printed and "stopped at step 1 of 6" in printed
    assert "continue with: metareg perturb transfer --out" in printed and "paired" not in printed
    monkeypatch.setattr(transfer_module, "fit", real_fit)
    assert cli.main(["--no-progress", "perturb", "transfer", "--out", str(out), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert_same_tensors(tensors_of(tmp_path / "whole-base"), tensors_of(tmp_path / "mp-base"), TRANSFER_KEYS)
    paired = [line.split(" (paired")[1] for text in (whole, resumed) for line in text.splitlines() if "(paired" in line]
    assert len(paired) == 2 and paired[0].replace("whole", "mp") == paired[1]
