"""Built-in checkpoints (``metareg test --checkpoint builtin:NAME``, ``metareg checkpoints``) and the
chunked plan of a long reproduction."""

from __future__ import annotations

import json
import math

import pytest

from helpers import SHARED, assert_one_line, cli_in_process, tiny, tiny_transfer
from metareg import builtin, cli
from metareg.errors import CheckpointError
from metareg.runs.episodic import meta_test, save_result, train
from metareg.runs.packing import pack


@pytest.fixture
def packed(tmp_path, monkeypatch):
    """A tiny trained and tested run, shipped into a temporary built-in folder."""
    run = tmp_path / "run"
    config = tiny("train.steps=2")
    trainer = train(config, run, progress=False)
    save_result(meta_test(config, trainer.learner, episodes=4, progress=False), run / "test.json")
    folder = tmp_path / "builtin"
    monkeypatch.setattr(builtin, "FOLDER", folder)
    pack(
        run,
        "tiny",
        command="metareg train --preset quickstart ...",
        machine="2 CPU cores",
        note="unit test",
        folder=folder,
    )
    return folder / "tiny"


@pytest.mark.slow
def test_a_packed_checkpoint_lists_its_provenance_and_tests_like_its_run(packed, capsys, tmp_path, monkeypatch):
    assert builtin.available() == ["tiny"]
    record = builtin.provenance("tiny")
    assert record["iterations"] == 2 and record["machine"] == "2 CPU cores" and record["git_revision"]
    assert record["test"]["episodes"] == 4 and record["preset"] == "quickstart"
    assert {p.name for p in packed.iterdir()} == {"checkpoint.json", record["tensors"], "provenance.json"}
    assert (
        json.loads((packed / "checkpoint.json").read_text())["config"]["data"]["root"] is None
    )  # no maintainer's paths
    assert cli.main(["--no-progress", "checkpoints"]) == 0
    out = capsys.readouterr().out
    assert "builtin:tiny" in out and "unit test" in out and record["git_revision"] in out
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--no-progress", "test", "--checkpoint", "builtin:tiny", "--episodes", "4"]) == 0
    result = json.loads((tmp_path / "test-tiny.json").read_text())
    assert result["scores"] == json.loads((tmp_path / "run" / "test.json").read_text())["scores"]  # the same model


@pytest.mark.slow
def test_a_tampered_builtin_checkpoint_is_refused(packed, capsys):
    tensors = packed / builtin.provenance("tiny")["tensors"]
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    assert cli.main(["--no-progress", "test", "--checkpoint", "builtin:tiny", "--episodes", "2"]) == 2
    assert "checksum" in capsys.readouterr().err
    record = json.loads((packed / "checkpoint.json").read_text())
    record["sha256"] = "0" * 64  # an edited record no longer matches its provenance
    (packed / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not match its provenance"):
        builtin.resolve("builtin:tiny")
    with pytest.raises(CheckpointError, match="no built-in checkpoint"):
        builtin.resolve("builtin:nothing")


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin.available())
def test_every_shipped_checkpoint_reproduces_its_recorded_accuracy_on_50_episodes(name, tmp_path, monkeypatch, capsys):
    """`metareg test --checkpoint builtin:NAME` on the first 50 episodes of the recorded protocol (its
    test seed and noise samples): the mean accuracy lies within 4 standard errors of the recorded
    1000-episode mean (the per-episode spread read off the recorded CI; 4 SE = 3.2 points). Catches a
    shipped model that loads wrong weights (checked: with its last conv block re-initialized it scores
    59.7% against the recorded 71.2% and fails; a re-initialized head alone is re-learned by the
    inner loop), or is tested on another protocol."""
    if not (SHARED / "omniglot").is_dir():
        pytest.skip(f"the shipped checkpoints are Omniglot models; no Omniglot under {SHARED}")
    record = builtin.provenance(name)
    assert record["command"].startswith("metareg train") and record["note"]
    recorded = record["test"]
    monkeypatch.chdir(tmp_path)
    episodes = 50
    args = ["--no-progress", "test", "--checkpoint", f"builtin:{name}", "--episodes", str(episodes)]
    args += ["--test-seed", str(recorded["protocol"]["seed"]), "--mc-samples", str(recorded["protocol"]["mc_samples"])]
    assert cli.main([*args, "--data-root", str(SHARED / "omniglot"), "--out", str(tmp_path / "t.json")]) == 0
    assert "accuracy" in capsys.readouterr().out
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["protocol"] == recorded["protocol"] | {"episodes": episodes}
    spread = recorded["ci95"] / 1.96 * math.sqrt(recorded["episodes"])  # the per-episode standard deviation
    assert abs(result["mean"] - recorded["mean"]) < 4 * spread / math.sqrt(episodes), (result["mean"], recorded)


@pytest.mark.slow
def test_the_plan_of_a_chunked_reproduction(tmp_path):
    from metareg.runs.reproduce import EXPERIMENTS, plan

    experiment = EXPERIMENTS["metadropout-table-1"]
    assert [r.name for r in experiment.runs[:2]] == ["omniglot-20w1s", "omniglot-20w1s-metadropout"]  # the pair first
    assert experiment.runs[0].paper == {1: "95.23 +- 0.17"} and experiment.runs[1].paper == {1: "96.63 +- 0.13"}
    run = tmp_path / "omniglot-20w1s"
    train(tiny("train.steps=2"), run, progress=False)
    text = plan("metadropout-table-1", tmp_path)
    assert "omniglot-20w1s " in text and "2 / 60000 iterations" in text and "s/iteration (its log)" in text
    assert "--time-budget SECONDS" in text


def test_the_table_reports_paired_differences_on_the_same_episodes():
    from metareg.evaluate import paired_difference
    from metareg.runs.reproduce import EXPERIMENTS, _markdown

    experiment = EXPERIMENTS["metadropout-table-1"]
    a, b = [0.9, 0.95, 1.0, 0.85], [0.9, 0.9, 0.95, 0.85]
    results = {
        "omniglot-20w1s-metadropout": {1: {"mean": 0.925, "ci95": 0.05, "scores": a}},
        "omniglot-20w1s": {1: {"mean": 0.9, "ci95": 0.03, "scores": b}},
    }
    statuses = {r.name: "done" if r.name in results else "unfinished" for r in experiment.runs}
    text = _markdown(experiment, statuses, results, None, 4)
    d = paired_difference(a, b)
    row = next(line for line in text.splitlines() if line.startswith("| MAML + Meta-dropout - MAML (paired)"))
    assert f"+{100 * d.mean:.2f} +- {100 * d.ci95:.2f}" in row and row.count("| -") == 3
    assert "| MAML | 90.00 +- 3.00 [95.23 +- 0.17] | unfinished" in text


@pytest.mark.slow
def test_packing_refuses_what_it_cannot_ship_in_one_line(tmp_path, capsys):
    """`metareg checkpoints --pack RUN`: without --name, a folder without a checkpoint, a run not yet
    tested, a transfer run, a name that is already shipped: each one line (exit 2), nothing written
    to the built-in folder."""
    from metareg.runs.transfer import transfer

    run, config = tmp_path / "run", tiny("train.steps=1")
    learner = train(config, run, progress=False).learner
    transfer(tiny_transfer("perturb.name=none", "train.steps=1", "against_base=false"), tmp_path / "tr", progress=False)
    shipped = sorted(p.name for p in builtin.FOLDER.iterdir())
    cases = [
        ([str(run)], ["--pack needs --name"]),
        ([str(tmp_path / "nothing"), "--name", "x"], ["no checkpoint"]),
        ([str(run), "--name", "x"], ["has no test.json", "test it before shipping"]),
        ([str(tmp_path / "tr"), "--name", "x"], ["only episodic"]),
    ]
    for args, fragments in cases:
        assert_one_line(*cli_in_process(capsys, "checkpoints", "--pack", *args), *fragments)
    save_result(meta_test(config, learner, episodes=2, progress=False), run / "test.json")
    name = builtin.available()[0]
    assert_one_line(*cli_in_process(capsys, "checkpoints", "--pack", str(run), "--name", name), "exists", "remove it")
    assert sorted(p.name for p in builtin.FOLDER.iterdir()) == shipped
