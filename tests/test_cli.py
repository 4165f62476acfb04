"""The command line: every bad input is one line on stderr and exit status 2, never a traceback."""

import json

import pytest

from helpers import SHARED, TINY, assert_one_line, cli_in_process, cli_subprocess, flags, meta_config, tiny

pytestmark = pytest.mark.slow  # every test here trains or tests runs, or starts processes

TINY_FLAGS = flags(TINY)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--set", "data.way=2000"], ["2000", "way"]),
        (["train", "--set", "data.shot=15", "--set", "data.query=15"], ["shot", "query"]),
        (["train", "--set", "train.bogus=1"], ["unknown config key 'train.bogus'"]),
        (["train", "--preset", "no-such-preset"], ["unknown preset 'no-such-preset'"]),
        (
            ["train", "--preset", "omniglot-20w1s", "--data-root", "/nonexistent/omniglot"],
            ["metareg download omniglot"],
        ),
        (["train", "--config", "/nonexistent.yaml"], ["does not exist"]),
        (["test", "--checkpoint", "/nonexistent/run"], ["no checkpoint"]),
        (["train", "--resume"], ["--resume needs --out"]),
        (["train", "--set", "model.backbone=resnet9000"], ["unknown backbone"]),
        (["train", "--device", "cuda:7"], ["cuda"]),
    ],
)
def test_bad_input_gets_one_line(tmp_path, args, fragments):
    done = (
        cli_subprocess(*args, "--out", str(tmp_path / "run"))
        if args[0] == "train" and "--out" not in args and "--resume" not in args
        else cli_subprocess(*args)
    )
    assert_one_line(done.returncode, done.stderr, *fragments)


def test_train_test_compare_end_to_end(tmp_path):
    for name in ("a", "b"):
        done = cli_subprocess(
            "train", *TINY_FLAGS, "--iterations", "2", "--seed", str(len(name)), "--out", str(tmp_path / name)
        )
        assert done.returncode == 0, done.stderr
        assert "test accuracy:" in done.stdout and "+-" in done.stdout
    result = json.loads((tmp_path / "a" / "test.json").read_text())
    assert len(result["scores"]) == 6 and result["protocol"]["way"] == 3
    done = cli_subprocess(
        "test", "--checkpoint", str(tmp_path / "a"), "--episodes", "5", "--out", str(tmp_path / "t.json")
    )
    assert done.returncode == 0 and "5 episodes" in done.stdout
    done = cli_subprocess("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--episodes", "5")
    assert done.returncode == 0, done.stderr
    assert "A - B (paired over the same 5 episodes)" in done.stdout
    # Results measured on different episodes are refused.
    done = cli_subprocess("compare", str(tmp_path / "a" / "test.json"), str(tmp_path / "t.json"))
    assert_one_line(done.returncode, done.stderr, "not measured on the same episodes")


def test_corrupt_checkpoint_on_the_command_line(tmp_path):
    done = cli_subprocess("train", *TINY_FLAGS, "--iterations", "1", "--no-test", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (tmp_path / "checkpoint.json").write_text("{")
    done = cli_subprocess("test", "--checkpoint", str(tmp_path))
    assert_one_line(done.returncode, done.stderr, "not a readable checkpoint")
    done = cli_subprocess("train", "--out", str(tmp_path), "--resume")
    assert_one_line(done.returncode, done.stderr, "checkpoint")


def test_presets_lists_paper_rows():
    done = cli_subprocess("presets")
    assert done.returncode == 0 and "95.23" in done.stdout and "0.71" in done.stdout


def test_download_from_a_local_mirror(tmp_path):
    if not (SHARED / "omniglot" / "images_background.zip").exists():
        pytest.skip("../shared/data/omniglot is absent")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        (mirror / name).symlink_to(SHARED / "omniglot" / name)
    done = cli_subprocess("download", "omniglot", "--to", str(tmp_path / "dest"), "--base-url", mirror.as_uri() + "/")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dest" / "images_background.zip").exists()
    (mirror / "images_evaluation.zip").unlink()
    (mirror / "images_evaluation.zip").write_bytes(b"not the archive")
    (tmp_path / "dest" / "images_evaluation.zip").unlink()
    done = cli_subprocess("download", "omniglot", "--to", str(tmp_path / "dest"), "--base-url", mirror.as_uri() + "/")
    assert_one_line(done.returncode, done.stderr, "checksum")


def test_plot_curves_from_a_log(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text(
        "step,loss,score,val_score,val_ci95,seconds,tasks_per_s\n10,1.5,0.4,,,1,4\n20,1.2,0.5,0.55,0.03,2,4\n"
    )
    done = cli_subprocess("plot", "curves", str(tmp_path / "run"), "--out", str(tmp_path / "c.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    done = cli_subprocess("plot", "curves", str(tmp_path / "nothing"))
    assert_one_line(done.returncode, done.stderr, "no training log")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tested episodic run and a MetaPerturb meta-training run (one step)."""
    from metareg.runs.episodic import train
    from metareg.runs.metaperturb import meta_train

    folder = tmp_path_factory.mktemp("cli")
    train(tiny("train.steps=1"), folder / "run", progress=False)
    meta_train(meta_config("train.steps=1"), folder / "phi", progress=False)
    return folder


def test_flag_combinations_that_make_no_sense_get_one_line(trained, tmp_path, capsys):
    """Each in one line, exit status 2, before any work: --epsilon without --attack (and --attack
    without --epsilon) in test and train (train used to train the whole run first, then refuse),
    `plot robustness` without --attack, `plot features` of two runs, `compare` of a meta-training
    run or of a JSON file that is not a result."""
    run = str(trained / "run")
    cases = [
        (["test", "--checkpoint", run, "--epsilon", "0.1"], ["--epsilon needs --attack"]),
        (["test", "--checkpoint", run, "--attack", "pgd-l2"], ["--attack pgd-l2 needs --epsilon"]),
        (["plot", "robustness", run, "--out", str(tmp_path / "r.png")], ["plot robustness needs --attack"]),
        (["plot", "robustness", run, "--attack", "fgsm"], ["needs --attack and --epsilons"]),
        (["plot", "features", run, run, "--out", str(tmp_path / "f.png")], ["takes one run folder, got 2"]),
        (["compare", str(trained / "phi"), run], ["MetaPerturb meta-training run", "no test result"]),
        (["compare", run, str(trained / "phi")], ["MetaPerturb meta-training run"]),
        (["compare", str(trained / "run" / "config.json"), run], ["is not a test result written by metareg"]),
    ]
    for args, fragments in cases:
        assert_one_line(*cli_in_process(capsys, *args), *fragments)
    for flag in (["--epsilon", "0.1"], ["--attack", "fgsm"]):
        out = tmp_path / f"train{len(flag[0])}"
        assert_one_line(*cli_in_process(capsys, "train", *TINY_FLAGS, "--out", str(out), *flag), flag[0])
        assert not (out / "checkpoint.json").exists()  # refused before training
    assert not list(tmp_path.glob("*.png"))
