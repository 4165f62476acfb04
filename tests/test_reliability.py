"""Faults and bad input that must never lose, delete or silently corrupt anything, each answered in
one line: tampered checkpoint records, divergence, disk and permission faults, file modes,
durability order, schedules, statistics on too few episodes, logs that are not terminals."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import (
    TINY,
    assert_one_line,
    assert_same_tensors,
    cli_in_process,
    final_params,
    flags,
    tiny,
    write_tiny_mini,
)
from metareg import cli, files
from metareg.checkpoint import load_checkpoint, save_checkpoint
from metareg.config import parse_assignment
from metareg.errors import CheckpointError, ConfigError, DataError, DivergenceError
from metareg.evaluate import mean_ci, paired_difference
from metareg.fewshot import load_learner
from metareg.progress import Progress
from metareg.runs.common import resolve
from metareg.runs.episodic import meta_test, train

TINY_FLAGS = flags(TINY)


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ---------------------------------------------------------------------------- 1. tampered records
@pytest.mark.slow
@pytest.mark.parametrize("absolute", [False, True])
def test_a_checkpoint_record_cannot_name_a_file_outside_its_run_folder(tmp_path, capsys, absolute):
    other, run = tmp_path / "other", tmp_path / "run"
    train(tiny("train.steps=2", "train.checkpoint_every=2"), other, progress=False)
    train(tiny("train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    victim = other / json.loads((other / "checkpoint.json").read_text())["tensors"]
    record = json.loads((run / "checkpoint.json").read_text())
    record["tensors"] = str(victim) if absolute else f"../other/{victim.name}"
    record["sha256"] = files.sha256_file(victim)  # even a matching checksum does not make it ours
    (run / "checkpoint.json").write_text(json.dumps(record))
    status, err = cli_in_process(capsys, "train", "--out", str(run), "--resume", "--iterations", "4", "--no-test")
    assert_one_line(status, err, "not a plain .safetensors file name")
    assert victim.is_file()
    with pytest.raises(CheckpointError, match="plain"):
        load_checkpoint(run)
    # Saving over such a record (a record damaged while a run was going) deletes nothing.
    save_checkpoint(run, "checkpoint", {"x": torch.zeros(1)}, {}, step=9)
    assert victim.is_file()


@pytest.mark.slow
def test_a_record_naming_another_file_of_the_run_does_not_delete_it(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    record = json.loads((run / "checkpoint.json").read_text())
    record["tensors"] = "log.csv"
    (run / "checkpoint.json").write_text(json.dumps(record))
    save_checkpoint(run, "checkpoint", {"x": torch.zeros(1)}, {}, step=3)
    assert (run / "log.csv").is_file() and (run / "config.json").is_file()


# ------------------------------------------------------------------------------- 2-3. divergence
@pytest.mark.slow
def test_the_kept_checkpoint_always_evaluates_to_finite_numbers(tmp_path, capsys, monkeypatch):
    """A meta learning rate so large that step 2's loss is NaN: the checkpoint of step 1 held the
    exploding update (and was kept as 'good'); now it is never written."""
    run = tmp_path / "run"
    status, err = cli_in_process(
        capsys,
        "train",
        "--out",
        str(run),
        "--no-test",
        "--iterations",
        "6",
        *TINY_FLAGS,
        "--set",
        "train.lr=1e20",
        "--set",
        "train.checkpoint_every=1",
    )
    assert_one_line(status, err, "no checkpoint was written")
    assert not (run / "checkpoint.json").exists()
    # With a good checkpoint first, the one kept is that one and it evaluates to finite numbers.
    train(tiny("train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    good = final_params(run)
    from metareg.meta.trainer import MetaTrainer

    resume = MetaTrainer.resume

    def resume_with_a_huge_lr(self):
        resume(self)
        for group in self.optimizer.param_groups:
            group["lr"] = 1e20

    monkeypatch.setattr(MetaTrainer, "resume", resume_with_a_huge_lr)
    with pytest.raises(DivergenceError, match="step 2\\) is kept"):
        train(tiny("train.steps=8", "train.checkpoint_every=1"), run, resume=True, progress=False)
    after = final_params(run)
    assert_same_tensors(good, after)
    config, learner = load_learner(run)
    assert math.isfinite(meta_test(config, learner, episodes=4, progress=False).estimate.mean)


@pytest.mark.slow
def test_test_refuses_a_model_whose_outputs_are_not_finite(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny("train.steps=1"), run, progress=False)
    tensors, meta = load_checkpoint(run)
    tensors["param.model.head.weight"] = torch.full_like(tensors["param.model.head.weight"], float("nan"))
    save_checkpoint(
        run,
        "checkpoint",
        tensors,
        {k: v for k, v in meta.items() if k not in ("format", "version", "step", "tensors", "sha256")},
        step=meta["step"],
    )
    status, err = cli_in_process(capsys, "test", "--checkpoint", str(run), "--episodes", "3")
    assert_one_line(status, err, "not finite", "diverged")
    assert not (run / "test.json").exists()


@pytest.mark.parametrize("value", ["nan", "1e30"])
def test_divergence_before_the_first_checkpoint_says_none_was_written(tmp_path, capsys, value):
    run = tmp_path / "run"
    status, err = cli_in_process(
        capsys,
        "train",
        "--out",
        str(run),
        "--no-test",
        "--iterations",
        "4",
        *TINY_FLAGS,
        "--set",
        f"inner.lr={value}",
        "--set",
        "train.clip=null",
    )
    if value == "nan":
        assert_one_line(status, err, "inner.lr", "finite")
    else:
        assert_one_line(status, err, "no checkpoint was written")
        assert "checkpoint.json" not in err


def test_adam_overflow_is_one_line(tmp_path, capsys):
    status, err = cli_in_process(
        capsys,
        "train",
        "--out",
        str(tmp_path / "run"),
        "--no-test",
        "--iterations",
        "3",
        *TINY_FLAGS,
        "--set",
        "train.lr=1e300",
    )
    assert_one_line(status, err, "overflow", "no checkpoint was written")


@pytest.mark.slow
def test_nonfinite_weights_count_as_divergence(tmp_path):
    run = tmp_path / "run"
    trainer = train(tiny("train.steps=1"), run, progress=False)
    with torch.no_grad():
        next(trainer.learner.parameters()).fill_(float("inf"))
    assert "non-finite" in trainer.check()
    trainer.optimizer.state[next(trainer.learner.parameters())]["exp_avg"].fill_(float("nan"))
    assert trainer.check() is not None


# ------------------------------------------------------------------------------- 4. finite config
@pytest.mark.parametrize(
    "assignment",
    [
        "inner.lr=nan",
        "train.lr=inf",
        "train.clip=-inf",
        "train.clip=.nan",
        "perturb.options={init_std: .nan}",
    ],
)
def test_config_numbers_must_be_finite(assignment):
    with pytest.raises(ConfigError, match=r"finite|positive"):
        resolve("quickstart", None, [parse_assignment(assignment)])


def test_clip_must_be_positive():
    with pytest.raises(ConfigError, match=r"train\.clip"):
        resolve("quickstart", None, [parse_assignment("train.clip=0")])


def test_transfer_and_meta_train_numbers_must_be_finite():
    from metareg.config import MetaTrainConfig, TransferConfig

    with pytest.raises(ConfigError, match="finite"):
        resolve("transfer-quickstart", None, [parse_assignment("train.weight_decay=nan")], schema=TransferConfig)
    with pytest.raises(ConfigError, match="finite"):
        resolve("perturb-quickstart", None, [parse_assignment("train_fraction=nan")], schema=MetaTrainConfig)


# ------------------------------------------------------------------------- 5. disk and permissions
@pytest.mark.slow
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train(tiny("train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    before = final_params(run)

    def full(path, _data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("metareg.checkpoint.write_bytes_atomic", full)
    status, err = cli_in_process(capsys, "train", "--out", str(run), "--resume", "--iterations", "4", "--no-test")
    assert_one_line(status, err, "No space left on device", "step 2) is kept")
    after = final_params(run)
    assert_same_tensors(before, after)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint-00000002.safetensors",
        "checkpoint.json",
    ]


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, err = cli_in_process(
        capsys, "train", "--out", str(blocker / "run"), "--no-test", "--iterations", "1", *TINY_FLAGS
    )
    assert_one_line(status, err, "cannot access", str(blocker))


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train(tiny("train.steps=1"), run, progress=False)
    real = Path.read_bytes

    def denied(self):
        if self.suffix == ".safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    status, err = cli_in_process(capsys, "test", "--checkpoint", str(run), "--episodes", "2")
    assert_one_line(status, err, "cannot read", "Permission denied")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["test", "--checkpoint", "RUN", "--episodes", "-1"],
        ["compare", "RUN", "RUN", "--episodes", "-1"],
        ["train", "--out", "RUN", "--resume", "--episodes", "-1"],
        ["test", "--checkpoint", "RUN", "--shot", "0"],
        ["test", "--checkpoint", "RUN", "--mc-samples", "0"],
        ["train", "--out", "RUN", "--resume", "--iterations", "x"],
    ],
)
def test_bad_counts_are_one_line(tmp_path, capsys, args):
    run = tmp_path / "run"
    train(tiny("train.steps=1"), run, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.replace("RUN", str(run)) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "must be >= " in err or "expected an integer" in err


def test_a_permission_denied_image_is_not_called_corrupt(tmp_path, monkeypatch):
    from metareg.data import load_miniimagenet

    root = write_tiny_mini(tmp_path / "mini", {"a": 3, "b": 3}, size=(8, 8))
    real = Path.read_bytes

    def denied(self):
        if self.suffix == ".jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match="permission denied") as info:
        load_miniimagenet(root, "train", cache=False)
    assert "corrupt" not in str(info.value)


# ---------------------------------------------------------------------------------- 6. file modes
@pytest.mark.slow
def test_tensor_files_follow_the_umask_like_the_json(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.steps=1"), run, progress=False)
    expected = 0o666 & ~umask()
    for path in [*run.glob("checkpoint-*.safetensors"), run / "checkpoint.json", run / "config.json"]:
        assert path.stat().st_mode & 0o777 == expected, path
    from metareg.perturb.metaperturb import MetaPerturbFunction
    from metareg.perturb.pretrained import save_phi

    save_phi(tmp_path / "phi", MetaPerturbFunction(), {})
    assert (tmp_path / "phi" / "phi.safetensors").stat().st_mode & 0o777 == expected


def test_downloaded_archives_follow_the_umask(tmp_path):
    from metareg.data.download import download_omniglot, expected_files

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    infos = expected_files()
    for name in infos:
        (mirror / name).write_bytes(b"x")
    import hashlib

    fake = {name: {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()} for name in infos}
    import metareg.data.download as download

    original = download.expected_files
    download.expected_files = lambda _dataset="omniglot": fake
    try:
        paths = download_omniglot(tmp_path / "dest", base_url=mirror.as_uri(), progress=False)
    finally:
        download.expected_files = original
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask() for p in paths)
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(infos)  # no temporary file left


# --------------------------------------------------------------------------------- 7. durability
def test_checkpoint_writes_are_durable_in_the_right_order(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    def unlink(self, missing_ok=False):
        events.append(("unlink", str(self)))
        real_unlink(self, missing_ok=missing_ok)

    save_checkpoint(tmp_path, "checkpoint", {"x": torch.zeros(3)}, {}, step=1)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    save_checkpoint(tmp_path, "checkpoint", {"x": torch.ones(3)}, {}, step=2)
    new, old, record, folder = (
        str(tmp_path / "checkpoint-00000002.safetensors"),
        str(tmp_path / "checkpoint-00000001.safetensors"),
        str(tmp_path / "checkpoint.json"),
        str(tmp_path),
    )

    def index(event):
        return events.index(event)

    tensor_sync = next(
        i for i, (kind, path) in enumerate(events) if kind == "fsync" and ".checkpoint-00000002.safetensors" in path
    )
    assert tensor_sync < index(("rename", new)) < index(("fsync", folder))
    json_rename = index(("rename", record))
    json_sync = next(i for i, (kind, path) in enumerate(events) if kind == "fsync" and ".checkpoint.json" in path)
    folder_after_json = next(i for i, e in enumerate(events) if e == ("fsync", folder) and i > json_rename)
    assert json_sync < json_rename < folder_after_json < index(("unlink", old))
    assert not Path(old).exists() and load_checkpoint(tmp_path)[0]["x"].eq(1).all()


# ----------------------------------------------------------------------------- 8. DropGrad schedule
@pytest.mark.slow
def test_dropgrad_linear_schedule_follows_every_step_through_the_trainer(tmp_path, monkeypatch):
    from metareg.inner.dropgrad import DropGrad

    rates: list[float] = []
    real = DropGrad.update

    def update(self, grads, state, step):
        if step == 0 and self.training:
            rates.append(self.rate)
        return real(self, grads, state, step)

    monkeypatch.setattr(DropGrad, "update", update)
    config = tiny(
        "train.steps=6",
        "train.checkpoint_every=100",
        "train.val_every=100",
        "train.meta_batch=1",
        "inner.transforms=[{name: dropgrad, p: 0.6, schedule: linear}]",
    )
    train(config, tmp_path / "run", progress=False)
    assert rates == pytest.approx([0.6 * i / 6 for i in range(6)])


# ---------------------------------------------------------------------------- 9. statistics
def test_mean_ci_and_paired_difference_against_a_hand_calculation():
    values = [0.5, 0.75, 1.0, 0.25]
    mean = 0.625
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    e = mean_ci(values)
    assert e.mean == pytest.approx(mean) and e.ci95 == pytest.approx(1.96 * std / 2) and e.n == 4
    b = [0.5, 0.5, 0.75, 0.5]
    d = paired_difference(values, b)
    diffs = [x - y for x, y in zip(values, b)]
    dm = sum(diffs) / 4
    ds = math.sqrt(sum((x - dm) ** 2 for x in diffs) / 3)
    assert d.mean == pytest.approx(dm) and d.ci95 == pytest.approx(1.96 * ds / 2)
    assert "n/a" in mean_ci([0.5]).format()


def test_statistics_edge_cases_found_by_mutation_testing():
    """Two values already have an interval; values are summed in float64 (a float32 sum would lose
    a 1e-9 difference); errors say what is wrong; ``format`` scales mean and interval alike, with two
    digits by default, and calls only a single value "one value". Each assertion kills a mutant that
    survived mutmut (evaluate/stats.py)."""
    from metareg.evaluate import Estimate

    two = mean_ci([0.0, 1.0])
    assert two.ci95 == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(2)) and two.n == 2
    assert mean_ci([1.0, 1.0 + 1e-9]).ci95 > 0
    assert paired_difference([1.0 + 1e-9, 1.0], [1.0, 1.0]).mean == pytest.approx(5e-10, rel=1e-6)
    assert paired_difference([1.0, 1.0], [1.0 + 1e-9, 1.0]).mean == pytest.approx(-5e-10, rel=1e-6)
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    with pytest.raises(ValueError, match="needs the same episodes: 3 vs 2 values"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    assert Estimate(0.5, 0.125, 10).format() == "0.50 +- 0.12"
    assert Estimate(0.5, 0.125, 10).format(100, 1) == "50.0 +- 12.5"
    assert Estimate(0.5, math.nan, 1).format(100) == "50.00 +- n/a (one value: no interval)"
    assert Estimate(0.5, 0.1, 2).format() == "0.50 +- 0.10"
    assert Estimate(0.5, math.nan, 3).format() == "0.50 +- nan"  # NaN scores are not "one value"


@pytest.mark.slow
def test_compare_refuses_fewer_than_two_episodes(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny("train.steps=1"), run, progress=False)
    status, err = cli_in_process(capsys, "compare", str(run), str(run), "--episodes", "1")
    assert_one_line(status, err, "at least 2 episodes")


# ------------------------------------------------------------------------------------- 10. logs
def test_progress_to_a_file_is_a_few_plain_lines():
    stream = io.StringIO()
    bar = Progress(1000, desc="meta-train", enabled=True, stream=stream)
    for i in range(1000):
        bar.update(1)
        if i % 10 == 0:
            bar.metrics({"loss": 0.5})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[4].startswith("meta-train: 500/1000 it (50%)") and "ETA" in lines[4] and "loss 0.500" in lines[4]
    assert lines[-1].startswith("meta-train: 1000/1000 it (100%)")


@pytest.mark.slow
def test_a_training_log_file_is_short(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "log.txt"
    with log.open("w") as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "metareg.cli",
                "train",
                "--out",
                str(tmp_path / "run"),
                "--iterations",
                "40",
                *TINY_FLAGS,
                "--set",
                "eval.episodes=40",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
        )
    text = log.read_text()
    assert "\r" not in text and len(text.splitlines()) < 40, text


def test_the_data_root_is_stored_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve("omniglot-20w1s", None, [parse_assignment("data.root=data/omniglot")])
    assert config.data.root == str(tmp_path / "data" / "omniglot")
