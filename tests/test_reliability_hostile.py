"""Hostile input, second round (issue 20, and bugs A-C of issue 21): every case a probe found is
answered in one line with exit status 2 (or does the right thing), and nothing already written
changes. One section per family of the issue: config numbers and counts (one validation,
``metareg.config.RANGES`` and ``metareg.preflight``), checkpoint records edited with a recomputed
checksum, side files of a run folder (one reader), results written only by their owner, the run
folder lock, built-in checkpoints, messages, and the torchrun meta-test with idle processes.

Every test here failed on the code before these fixes (commit bc9995b); the docstrings say which
mutation of the fix each one catches."""

from __future__ import annotations

import functools
import json
import operator
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import TINY, assert_one_line, cli_in_process, flags, tiny, write_tiny_mini
from metareg import builtin, cli, files
from metareg.checkpoint import load_checkpoint, save_checkpoint
from metareg.config import TransferConfig, parse_assignment
from metareg.errors import CheckpointError, ConfigError, DataError
from metareg.runs.common import resolve
from metareg.runs.episodic import meta_test, save_result, train

TINY_FLAGS = flags(TINY)

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def status_of(capsys, *args: str) -> tuple[int, str]:
    """:func:`cli_in_process`, counting argparse's refusals (SystemExit) as the exit status they are."""
    try:
        return cli_in_process(capsys, *args)
    except SystemExit as done:
        return int(done.code), capsys.readouterr().err.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder with its bytes (the lock file's holder note aside)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".metareg.lock"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny meta-trained run (2 steps, checkpoint at 2) with its test.json."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = tiny("train.steps=2", "train.checkpoint_every=2")
    trainer = train(config, run, progress=False)
    save_result(meta_test(config, trainer.learner, episodes=4, progress=False), run / "test.json")
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


TINY_TRANSFER = [
    "data.image_size=16",
    "train.batch_size=8",
    "train.steps=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "model.options.channels=8",
    "perturb.mc_samples=2",
    "perturb.name=dropout",
]


@pytest.fixture(scope="module")
def transferred(tmp_path_factory) -> Path:
    """A tiny transfer run with its --against-base Base run (``<run>-base``)."""
    from metareg.runs.transfer import transfer

    out = tmp_path_factory.mktemp("transfer") / "t"
    config = resolve("transfer-quickstart", None, [parse_assignment(s) for s in TINY_TRANSFER], schema=TransferConfig)
    assert config.against_base
    assert transfer(config, out, progress=False) is not None
    return out


# ------------------------------------------------------------------ 1-2. config numbers and counts
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--seed", "1180591620717411303424"], ["must be <= 9223372036854775807"]),
        (["--set", "seed=-3"], ["seed must be a whole number in 0..9223372036854775807, got -3"]),
        (["--set", "eval.seed=-1"], ["eval.seed must be"]),
        (["--set", "train.val_episodes=0"], ["train.val_episodes must be >= 1"]),
        (["--set", "train.val_episodes=-2"], ["train.val_episodes must be >= 1"]),
        (["--set", "inner.eval_steps=-1"], ["inner.eval_steps must be >= 1"]),
        (["--set", "data.eval_shot=0"], ["data.eval_shot must be >= 1"]),
        (["--set", "model.options={channels: -4}"], ["backbone 'conv4'", "negative dimension"]),
        (["--set", "model.options={channels: 3.5}"], ["backbone 'conv4'"]),
        (["--set", "perturb.name=dropout", "--set", "perturb.options={p: [0.1]}"], ["option 'p' must be float"]),
        (["--set", "perturb.name=dropblock", "--set", "perturb.options={schedule: cosine}"], ["'schedule'"]),
        (["--set", "inner.transforms=[{name: dropgrad, p: x}]"], ["gradient transform 'dropgrad' option 'p'"]),
        (["--set", "train=5"], ["config section 'train' must be a mapping"]),
        (["--set", "train=null"], ["config section 'train' must be a mapping"]),
        (["--set", "train.meta_batch=1000000000"], ["train.meta_batch=1000000000", "needs at least", "TB"]),
        (["--set", "inner.mc_samples=1000000000"], ["inner.mc_samples=1000000000", "needs at least"]),
        (["--set", "model.options={channels: 1000000}"], ["the network", "needs at least"]),
        (["--set", "data.options={num_classes: 1000000000}"], ["1000000000 classes", "needs at least"]),
        (["--set", "eval.episodes=100000000000000000000"], ["eval.episodes", "2**63"]),
        (["--steps", "100000000000000000000"], ["must be <= 9223372036854775807"]),
        (["--set", "data.options={when: !!set {a}}"], ["holds a set"]),
    ],
    ids=[
        "seed-flag-huge",
        "seed-negative",
        "eval-seed-negative",
        "val-episodes-0",
        "val-episodes-negative",
        "eval-steps-negative",
        "eval-shot-0",
        "channels-negative",
        "channels-float",
        "perturb-option-type",
        "perturb-option-literal",
        "transform-option-type",
        "section-scalar",
        "section-null",
        "memory-meta-batch",
        "memory-mc-samples",
        "memory-channels",
        "memory-classes",
        "count-beyond-int64",
        "steps-flag-beyond-int64",
        "date-value",
    ],
)
def test_config_numbers_and_counts_are_checked_against_their_meaning(tmp_path, capsys, extra, fragments):
    """Before the fix: tracebacks (ValueError, AttributeError, RuntimeError, the allocator) or runs
    that silently reset a section, skip adaptation or test at 1 shot. Mutations caught: a RANGES
    entry removed (the seed, val_episodes, eval_steps, eval_shot rows), ``merge`` without its section
    check (``train=5``), ``create_model`` catching TypeError only, ``require`` never raising, the
    options' type check skipped."""
    out = tmp_path / "run"
    status, err = status_of(capsys, "train", "--out", str(out), "--no-test", "--steps", "1", *TINY_FLAGS, *extra)
    assert_one_line(status, err, *fragments)
    assert not (out / "checkpoint.json").exists()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_nested_900_levels_deep_is_one_line(tmp_path, capsys, suffix):
    """Before the fix: RecursionError. Mutation caught: ``check_depth`` or the RecursionError guard removed."""
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"model": {"options": ' + '{"a": ' * 900 + "1" + "}" * 902)
    status, err = status_of(capsys, "train", "--out", str(tmp_path / "run"), "--no-test", "--config", str(path))
    assert_one_line(status, err, "nests deeper than")
    path.write_text('{"model": {"options": ' + '{"a": ' * 40 + "1" + "}" * 42)  # deeper than 32: refused too
    status, err = status_of(capsys, "train", "--out", str(tmp_path / "run"), "--no-test", "--config", str(path))
    assert_one_line(status, err, "nests deeper than 32 levels")


def test_test_with_a_billion_mc_samples_is_refused_before_allocating(run, capsys):
    """Before the fix: the allocator failed (traceback). Mutation caught: ``check(config)`` dropped
    from the test path."""
    before = snapshot(run)
    status, err = status_of(capsys, "test", "--checkpoint", str(run), "--mc-samples", "1000000000", "--episodes", "2")
    assert_one_line(status, err, "inner.eval_mc_samples=1000000000", "needs at least")
    assert snapshot(run) == before


def test_a_decompression_bomb_image_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A 20000 x 20000 PNG among the miniImageNet images (here: PIL's limit lowered so that an 8 x 8
    image is one). Before the fix: PIL's DecompressionBombError. Mutation caught: the bomb's except
    clause removed from ``decode_image``."""
    from metareg.data import load_miniimagenet

    root = write_tiny_mini(tmp_path / "mini", {"a": 2, "b": 2}, size=(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match="too large to decode") as info:
        load_miniimagenet(root, "train", cache=False)
    assert "a00000001.jpg" in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------- 3. checkpoint records with a recomputed checksum
def _tamper_tensors(name: str, value: torch.Tensor):
    def edit(tensors, _meta):
        keys = [k for k in tensors if k == name or k.endswith(name)]
        assert keys, name
        for key in keys:
            tensors[key] = value.clone()
        return 2

    return edit


def _step(value):
    def edit(_tensors, _meta):
        return value

    return edit


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_tamper_tensors("rng.torch", torch.zeros(3, dtype=torch.uint8)), "does not fit this run"),
        (_tamper_tensors(".step", torch.tensor(-5.0)), "step count is [-5.0]"),
        (_tamper_tensors(".step", torch.tensor(1.5)), "not a whole number"),
        (_tamper_tensors(".exp_avg_sq", torch.tensor(-1.0)), "shape"),
        (_step(-7), "holds step -7"),
        (_step("abc"), "holds step 'abc'"),
    ],
)
def test_edited_checkpoints_with_a_recomputed_checksum_are_one_line(run, capsys, edit, fragment):
    """Before the fix: Adam's step -5 made a complex bias correction (RuntimeError traceback), step
    -7 resumed and logged steps -6 ... 4. Mutations caught: ``optimizer_problem`` not called in
    ``resume`` (or accepting negative or fractional counts), ``record_step`` accepting any integer."""
    tensors, meta = load_checkpoint(run)
    step = edit(tensors, meta)
    info = {k: v for k, v in meta.items() if k not in ("format", "version", "step", "tensors", "sha256")}
    save_checkpoint(run, "checkpoint", tensors, info, step=2)
    if step != 2:  # the record's step itself (the checksum covers the tensors)
        record = json.loads((run / "checkpoint.json").read_text())
        (run / "checkpoint.json").write_text(json.dumps(record | {"step": step}))
    before = snapshot(run)
    status, err = status_of(capsys, "train", "--out", str(run), "--resume", "--steps", "4", "--no-test")
    assert_one_line(status, err, fragment)
    assert snapshot(run) == before


# ------------------------------------------------------------------------- 4. side files of a run folder
def test_compare_refuses_nan_scores_and_damaged_results_in_one_line(tmp_path, capsys, trained):
    """Before the fix: "nan +- nan % -> B is better" (exit 0), and a traceback for a cut-off file.
    Mutation caught: the finite-scores check of ``read_result`` removed."""
    good = json.loads((trained / "test.json").read_text())
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(good | {"scores": [float("nan"), *good["scores"][1:]]}))
    status, err = status_of(capsys, "compare", str(nan), str(trained / "test.json"))
    assert_one_line(status, err, str(nan), "holds scores that are not all finite numbers")
    cut = tmp_path / "cut.json"
    cut.write_text((trained / "test.json").read_text()[:50])
    status, err = status_of(capsys, "compare", str(cut), str(trained / "test.json"))
    assert_one_line(status, err, str(cut), "cut off")
    status, err = status_of(
        capsys, "compare", str(trained / "test.json"), str(trained / "test.json"), "--episodes", "9"
    )
    assert_one_line(status, err, "--episodes applies to checkpoints tested now")  # never ignored silently


def test_compare_itself_refuses_nan_scores():
    """(The library's ``compare``, for results made in memory.) Mutation caught: its finite check removed."""
    from metareg.evaluate import EvalResult
    from metareg.runs.episodic import compare

    a = EvalResult(torch.tensor([0.5, float("nan")], dtype=torch.float64), {"episodes": 2})
    b = EvalResult(torch.tensor([0.5, 0.25], dtype=torch.float64), {"episodes": 2})
    with pytest.raises(ConfigError, match="A's scores are not all finite"):
        compare(a, b)


def test_the_robustness_cache_is_keyed_by_the_checkpoint_and_recomputed_when_damaged(run):
    """Before the fix: more training left the old numbers in place (the cache did not record which
    checkpoint it measured), and a truncated robustness.json was a JSONDecodeError traceback.
    Mutations caught: the checkpoint comparison in ``_cache`` removed; its damage guard removed."""
    from metareg.runs.robustness import robust_accuracy

    first = robust_accuracy(run, "fgsm", 0.1, episodes=2)
    cache = json.loads((run / "robustness.json").read_text())
    key = next(iter(cache["results"]))
    assert cache["checkpoint"]["step"] == 2
    cache["results"][key] = 0.123  # so that a cache hit shows
    (run / "robustness.json").write_text(json.dumps(cache))
    assert robust_accuracy(run, "fgsm", 0.1, episodes=2) == 0.123
    (run / "robustness.json").write_text(json.dumps(cache)[:40])  # cut off: measured again
    assert robust_accuracy(run, "fgsm", 0.1, episodes=2) == first
    cache = json.loads((run / "robustness.json").read_text())
    cache["results"][key] = 0.123
    (run / "robustness.json").write_text(json.dumps(cache))
    train(tiny("train.steps=4", "train.checkpoint_every=2"), run, resume=True, progress=False)
    assert robust_accuracy(run, "fgsm", 0.1, episodes=2) != 0.123  # the run trained on: measured again
    assert json.loads((run / "robustness.json").read_text())["checkpoint"]["step"] == 4


def test_a_damaged_training_log_is_one_line(run, capsys):
    """Mutation caught: the damage guard of ``read_log`` removed (a ValueError traceback)."""
    (run / "log.csv").write_text("step,loss\n1,abc\n")
    status, err = status_of(capsys, "plot", "curves", str(run), "--out", str(run.parent / "c.png"))
    assert_one_line(status, err, "log.csv is damaged")


def test_a_stored_config_out_of_range_is_one_line(run, capsys):
    """A checkpoint record whose config was edited to eval.seed -1. Before the fix: ValueError from
    torch.manual_seed. Mutation caught: ``validate`` not called on stored configs."""
    record = json.loads((run / "checkpoint.json").read_text())
    record["config"]["eval"]["seed"] = -1
    (run / "checkpoint.json").write_text(json.dumps(record))
    status, err = status_of(capsys, "test", "--checkpoint", str(run), "--episodes", "2")
    assert_one_line(status, err, "eval.seed must be")


# ----------------------------------------------------------- 5. results written only by their owner
def test_test_of_a_transfer_run_rewrites_nothing(transferred, capsys):
    """Before the fix: `metareg test --checkpoint TRANSFER_RUN --episodes 2` rewrote its test.json
    without ten fields, ignoring --episodes. Mutation caught: the kind check of ``cmd_test`` removed."""
    before = snapshot(transferred)
    status, err = status_of(capsys, "test", "--checkpoint", str(transferred), "--episodes", "2")
    assert_one_line(status, err, "is a transfer run", "test.json")
    assert snapshot(transferred) == before


def test_a_test_on_other_episodes_keeps_the_run_result(run, capsys):
    """`metareg test` on other episodes (here 2 instead of the 4 the run was tested on) writes
    beside test.json, which keeps its result. Mutation caught: ``result_path`` returning its path."""
    before = (run / "test.json").read_bytes()
    status, _ = status_of(capsys, "test", "--checkpoint", str(run), "--episodes", "2")
    assert status == 0
    assert (run / "test.json").read_bytes() == before
    (other,) = list(run.glob("test-*.json"))
    assert len(json.loads(other.read_text())["scores"]) == 2
    status, _ = status_of(capsys, "test", "--checkpoint", str(run), "--episodes", "4")  # the same episodes
    assert status == 0 and len(list(run.glob("test-*.json"))) == 1


@pytest.mark.parametrize("change", ["data.seed=1", "train.steps=3"])
def test_against_base_refuses_a_base_run_of_other_settings(transferred, tmp_path, capsys, change):
    """Bug B (issue 21): a stale OUT-base (another data seed, another schedule) was reused, or
    continued under the new settings, and a "paired" difference printed. Mutation caught:
    ``check_base`` not called (or its comparison emptied)."""
    out = tmp_path / "t"
    shutil.copytree(Path(f"{transferred}-base"), Path(f"{out}-base"))
    before = snapshot(Path(f"{out}-base"))
    flags = functools.reduce(operator.iadd, (["--set", s] for s in [*TINY_TRANSFER, change]), [])
    status, err = status_of(capsys, "perturb", "transfer", "--preset", "transfer-quickstart", "--out", str(out), *flags)
    assert_one_line(status, err, f"{out}-base holds a Base run of other settings", change.split("=")[0])
    assert snapshot(Path(f"{out}-base")) == before
    assert not (out / "checkpoint.json").exists()  # refused before anything trained


def test_against_base_pairs_with_a_base_run_of_the_same_settings(transferred, tmp_path, capsys):
    """The Base run of the same settings is reused (no retraining) and the difference is printed."""
    out = tmp_path / "t"
    shutil.copytree(Path(f"{transferred}-base"), Path(f"{out}-base"))
    before = snapshot(Path(f"{out}-base"))
    flags = functools.reduce(operator.iadd, (["--set", s] for s in TINY_TRANSFER), [])
    assert (
        cli.main(["--no-progress", "perturb", "transfer", "--preset", "transfer-quickstart", "--out", str(out), *flags])
        == 0
    )
    assert "paired over the same" in capsys.readouterr().out
    assert snapshot(Path(f"{out}-base")) == before


# --------------------------------------------------------------------------------- 6. the run folder lock
def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock, as a running `metareg train` would."""
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(folder / '.metareg.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()} metareg train --out elsewhere'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_of_a_run_folder_is_refused_and_a_killed_one_frees_it(run, capsys):
    """Before the fix: two `metareg train` with the same --out both ran and both claimed the
    checkpoint. The lock dies with its process (SIGKILL), and its file left behind is harmless.
    Mutations caught: ``run_lock`` acquiring nothing (the second writer runs), a blocking flock (a hang)."""
    holder = _hold_lock(run)
    try:
        before = snapshot(run)
        status, err = status_of(capsys, "train", "--out", str(run), "--resume", "--steps", "4", "--no-test")
        assert_one_line(status, err, "is in use by process", str(holder.pid), "metareg train --out elsewhere")
        assert snapshot(run) == before
        status, err = status_of(capsys, "test", "--checkpoint", str(run), "--episodes", "2")
        assert_one_line(status, err, "is in use by")  # its test.json is the trainer's to write now
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".metareg.lock").exists()
    status, _ = status_of(capsys, "train", "--out", str(run), "--resume", "--steps", "3", "--no-test")
    assert status == 0 and json.loads((run / "checkpoint.json").read_text())["step"] == 3


def test_hidden_temporary_files_of_a_killed_writer_are_removed_by_the_next_one(run, capsys):
    """Before the fix: `.checkpoint*.tmp` left by a kill during a write stayed forever. Only our own
    temporary names are removed, only in the run folder. Mutation caught: ``remove_temporaries``
    not called when the lock is taken; its pattern widened to any hidden file."""
    ours = [
        ".checkpoint.json.4242.0badc0de.tmp",
        ".checkpoint-00000004.safetensors.7.deadbeef.tmp",
        ".x.json.9.12345678.part",
    ]
    theirs = [".notes.tmp", "keep.tmp", ".checkpoint.json.tmp", ".a.1.XYZ12345.tmp"]
    for name in ours + theirs:
        (run / name).write_text("left behind")
    (run / "sub").mkdir()
    (run / "sub" / ours[0]).write_text("not in the run folder itself")
    status, _ = status_of(capsys, "train", "--out", str(run), "--resume", "--steps", "3", "--no-test")
    assert status == 0
    assert not any((run / name).exists() for name in ours)
    assert all((run / name).exists() for name in theirs) and (run / "sub" / ours[0]).exists()


# ----------------------------------------------------------------------------------- 7. built-ins
def _shipped_copy(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "builtin"
    shutil.copytree(builtin.FOLDER / "omniglot-20w1s-cpu", folder / "omniglot-20w1s-cpu")
    monkeypatch.setattr(builtin, "FOLDER", folder)
    return folder / "omniglot-20w1s-cpu"


def test_editing_the_config_of_a_builtin_checkpoint_is_refused(tmp_path, monkeypatch):
    """Before the fix: editing config.inner.lr in a built-in's checkpoint.json went unnoticed
    (73.75 % -> 7.67 %): the checksum covered the tensors only. Mutation caught: ``resolve``
    checking the tensor file only."""
    copy = _shipped_copy(tmp_path, monkeypatch)
    assert builtin.resolve("builtin:omniglot-20w1s-cpu") == copy
    record = json.loads((copy / "checkpoint.json").read_text())
    record["config"]["inner"]["lr"] = 0.01
    (copy / "checkpoint.json").write_text(json.dumps(record, indent=2))
    with pytest.raises(CheckpointError, match=r"checksum of checkpoint\.json does not match") as info:
        builtin.resolve("builtin:omniglot-20w1s-cpu")
    assert "\n" not in str(info.value)


def test_the_shipped_builtin_keeps_its_tensors_byte_identical():
    """The repacked provenance lists every file; the tensors are the ones shipped before (their
    SHA-256, recorded since 8686e17)."""
    folder = builtin.resolve("builtin:omniglot-20w1s-cpu")
    record = builtin.provenance("omniglot-20w1s-cpu")
    assert set(record["files"]) == {"checkpoint.json", "checkpoint-00000200.safetensors"}
    digest = "74f8ec0157f78696c1397c902ec7b105609bc623e5e216839a8c462cae1009b8"
    assert files.sha256_file(folder / "checkpoint-00000200.safetensors") == digest == record["sha256"]


@pytest.mark.parametrize("name", ["../../../../tmp/x", "a/b", "..", ".hidden", ""])
def test_pack_refuses_a_name_that_is_a_path(run, tmp_path, monkeypatch, capsys, name):
    """Before the fix: `checkpoints --pack RUN --name ../../../../tmp/x` wrote outside the built-in
    folder. Mutation caught: ``check_name`` not called by ``pack``."""
    folder = tmp_path / "pkg" / "builtin"
    folder.mkdir(parents=True)
    monkeypatch.setattr(builtin, "FOLDER", folder)
    monkeypatch.setattr("metareg.runs.packing.FOLDER", folder)
    status, err = status_of(capsys, "checkpoints", "--pack", str(run), "--name", name, "--machine", "m")
    assert_one_line(status, err, "--name" if not name else "must be a plain name")
    assert list((tmp_path / "pkg").rglob("*")) == [folder]


# ------------------------------------------------------------------------------------ 8. attacks
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--attack", "fgsm", "--epsilon", "inf"], "finite"),
        (["--attack", "fgsm", "--epsilon", "nan"], "epsilon >= 0"),
        (["--attack", "pgd-linf", "--epsilon", "2"], "must be in [0, 1]"),
        (["--attack", "pgd-l2", "--epsilon", "1e308"], "larger than the distance between any two images"),
        (["--attack", "pgd-l1", "--epsilon", "1e9"], "epsilon must be in [0, 784]"),
        (["--fgsm", "0.1", "--attack", "pgd-l2", "--epsilon", "0.2"], "contradicts --attack pgd-l2 --epsilon 0.2"),
        (["--fgsm", "0.1", "--epsilon", "0.3"], "contradicts --epsilon 0.3"),
    ],
)
def test_attack_sizes_outside_the_image_cube_and_contradictions_are_one_line(run, capsys, flags, fragment):
    """Before the fix: inf accepted, 1e308 blamed on "diverged weights", --fgsm silently winning.
    L-infinity balls hold [0, 1]^d from radius 1, L2 from sqrt(d), L1 from d (d = 1 x 28 x 28 here).
    Mutations caught: the finiteness or L-infinity check of ``PGD.__post_init__`` removed;
    ``check_size`` accepting any size; the contradiction check of ``_attack`` removed."""
    before = snapshot(run)
    status, err = status_of(capsys, "test", "--checkpoint", str(run), "--episodes", "2", *flags)
    assert_one_line(status, err, fragment)
    assert snapshot(run) == before


@pytest.mark.parametrize(("name", "epsilon"), [("fgsm", 2.0), ("pgd-linf", 1.5), ("pgd-l2", float("inf"))])
def test_an_attack_is_refused_when_it_is_made_not_when_it_first_runs(name, epsilon):
    """The library refuses a size that fits no image before any image is seen (the ``adversarial``
    perturbation's epsilon is checked when the run is configured). Mutation caught: the L-infinity or
    finiteness check of ``PGD.__post_init__`` removed."""
    from metareg.evaluate.adversarial import make_attack

    with pytest.raises(ConfigError, match=r"pixel range|finite"):
        make_attack(name, epsilon)


# ----------------------------------------------------------------------------------- 9. messages
@pytest.mark.parametrize(
    ("argv", "patch", "expected"),
    [
        (
            ["perturb", "transfer", "--out", "OUT", "--preset", "transfer-quickstart"],
            "metareg.runs.transfer.transfer",
            "run the same command again (no checkpoint was written yet in OUT)",
        ),
        (
            ["perturb", "transfer", "--out", "TRANSFERRED", "--resume"],
            "metareg.runs.transfer.transfer",
            "metareg perturb transfer --out TRANSFERRED --resume",
        ),
        (
            ["perturb", "meta-train", "--out", "OUT", "--preset", "perturb-quickstart"],
            "metareg.runs.metaperturb.meta_train",
            "run the same command again (no checkpoint",
        ),
        (
            ["train", "--out", "RUN", "--resume", "--steps", "4"],
            "metareg.runs.episodic.train",
            "metareg train --out RUN --resume",
        ),
        (
            ["test", "--checkpoint", "RUN"],
            "metareg.cli._model_result",
            "run the same command again (nothing was written)",
        ),
        (["compare", "RUN", "RUN"], "metareg.cli._model_result", "run the same command again (nothing was written)"),
        (
            ["reproduce", "mtnet-table-6.1", "--out", "OUT"],
            "metareg.runs.reproduce.run_experiment",
            "metareg reproduce mtnet-table-6.1 --out OUT (run it again",
        ),
    ],
)
def test_an_interrupted_command_names_its_own_way_on(
    monkeypatch, capsys, tmp_path, run, transferred, argv, patch, expected
):
    """Bug C (issue 21): after Ctrl-C, `perturb transfer`, `test`, `perturb meta-train` and `reproduce`
    told the user to continue with `metareg train --out RUN --resume`. Mutation caught: a
    ``CONTINUE`` entry pointing at another command."""

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patch, interrupted)
    names = {"OUT": str(tmp_path / "out"), "RUN": str(run), "TRANSFERRED": str(transferred)}
    argv = [names.get(a, a) for a in argv]
    assert cli.main(["--no-progress", *argv]) == 130
    err = capsys.readouterr().err
    for name, value in names.items():
        expected = expected.replace(name, value)
    assert f"interrupted; continue with: {expected}" in err, err
    if argv[0] != "train":
        assert "metareg train --out" not in err


def test_a_data_root_that_is_a_file_is_called_a_file(tmp_path):
    """Before the fix: "does not exist". Mutation caught: ``check_root`` without its file case."""
    from metareg.data import load_miniimagenet, load_omniglot

    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    for load in (load_omniglot, load_miniimagenet):
        with pytest.raises(DataError, match="is a file, not a folder"):
            load(blocker, "train", cache=False)


def test_an_unreadable_zip_is_not_called_damaged(tmp_path, monkeypatch):
    """Before the fix: a zip that cannot be read (permissions) came with the advice to delete it.
    Mutation caught: PermissionError handled with BadZipFile again."""
    import zipfile

    from metareg.data import load_omniglot

    (tmp_path / "images_background.zip").write_bytes(b"PK")

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(zipfile, "ZipFile", denied)
    with pytest.raises(DataError, match=r"Permission denied.*check its permissions") as info:
        load_omniglot(tmp_path, "train", cache=False)
    assert "delete it" not in str(info.value)


def test_a_state_dict_mismatch_is_not_cut_off(run, capsys):
    """Before the fix: "checkpoint ... does not fit its model: Error(s) in loading state_dict for
    BilevelLearner:" and nothing more. Mutation caught: ``one_line`` replaced by the first line."""
    record = json.loads((run / "checkpoint.json").read_text())
    record["config"]["model"]["options"]["channels"] = 5
    (run / "checkpoint.json").write_text(json.dumps(record))
    status, err = status_of(capsys, "test", "--checkpoint", str(run), "--episodes", "2")
    assert_one_line(status, err, "size mismatch for", "BilevelLearner")


def test_an_oversized_download_is_refused_as_soon_as_it_exceeds_the_expected_size(tmp_path, monkeypatch):
    """Before the fix: the stream was read to its end (60 MB for an 8.9 MB file). Mutations caught:
    the size check of the read loop removed; the Content-Length check removed (file:// mirrors
    announce their size)."""
    import urllib.request

    import metareg.data.download as download

    monkeypatch.setattr(
        download, "expected_files", lambda _d="omniglot": {"images_background.zip": {"size": 1000, "sha256": "0" * 64}}
    )
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "images_background.zip").write_bytes(b"x" * 5000)
    with pytest.raises(DataError, match="announces 5000 bytes, more than the official file's 1000"):
        download.download_omniglot(tmp_path / "a", base_url=mirror.as_uri(), progress=False)

    read = []

    class Endless:  # a server that sends 50 MB (and announces nothing)
        headers = None

        def read(self, n):
            read.append(n if len(read) < 50 else 0)
            return b"x" * read[-1]

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *_a, **_k: Endless())
    with pytest.raises(DataError, match="sent more than the official file's 1000 bytes"):
        download.download_omniglot(tmp_path / "b", base_url="http://mirror.invalid", progress=False)
    assert sum(read) <= 1001
    assert list((tmp_path / "b").iterdir()) == []


# --------------------------------------------------------------- 10. torchrun: processes without episodes
def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    return subprocess.run(
        [*launcher, "metareg.cli", "--no-progress", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_torchrun_with_fewer_episodes_than_processes(tmp_path, trained):
    """Bug A (issue 21): a process with no episode of its own started its calibration totals as the
    int 0 and the all-reduce raised TypeError on it (rank 0 then blamed a stopped process). Here
    validation (train.val_episodes=1), the final test (eval.episodes=1) and `metareg test
    --episodes 1` each have one episode for two processes, and score it as one process does.
    Mutation caught: ``totals = 0`` again."""
    out = tmp_path / "run"
    flags = functools.reduce(
        operator.iadd, (["--set", s] for s in ["train.val_every=1", "train.val_episodes=1", "eval.episodes=1"]), []
    )
    done = _torchrun("train", "--out", str(out), "--steps", "2", *TINY_FLAGS, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads((out / "test.json").read_text())["scores"]) == 1
    done = _torchrun("test", "--checkpoint", str(trained), "--episodes", "1", "--out", str(tmp_path / "one.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    single = meta_test(*_loaded(trained), episodes=1, progress=False)
    assert json.loads((tmp_path / "one.json").read_text())["scores"] == single.scores.tolist()


def _loaded(run: Path):
    from metareg.fewshot import load_learner

    return load_learner(run)


def test_torchrun_refuses_a_locked_run_folder_on_every_process(run):
    """The first process holds the lock, the others learn it could not (one collective): the run
    stops at once on both, in one line each, instead of waiting for a collective that never comes.
    Mutation caught: the agreement collective of ``run_lock`` removed (the other process hangs)."""
    holder = _hold_lock(run)
    try:
        start = time.monotonic()
        done = _torchrun("train", "--out", str(run), "--resume", "--steps", "4", "--no-test", timeout=120)
        assert done.returncode != 0 and time.monotonic() - start < 100
        assert done.stderr.count("metareg train: error: run folder") == 2, done.stderr[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
