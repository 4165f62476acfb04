"""Hyperparameter selection of the transfer baselines (``metareg perturb transfer --select``): each
candidate of the perturbation's grid trains on the training images less a held-out validation split,
the best validation accuracy wins, and the run then trains on every training image with it."""

from __future__ import annotations

import json

import pytest

from helpers import TRANSFER_KEYS, assert_same_tensors, tensors_of, tiny_transfer
from metareg import cli
from metareg.data.labeled import hold_out
from metareg.runs.transfer import SELECTION_GRIDS, VALIDATION_FRACTION, target_data, transfer

pytestmark = pytest.mark.slow  # every test here trains or tests runs, or starts processes


def test_transfer_chooses_its_hyperparameters_on_a_held_out_validation_split(tmp_path):
    out = tmp_path / "run"
    config = tiny_transfer("perturb.name=information-dropout", "select=true")
    record = transfer(config, out, progress=False)
    selection = json.loads((out / "selection.json").read_text())
    grid = SELECTION_GRIDS["information-dropout"]["beta"]
    assert [c["options"]["beta"] for c in selection["candidates"]] == grid
    best = max(selection["candidates"], key=lambda c: c["validation_accuracy"])
    assert selection["chosen"] == best["options"] == {"beta": record["perturbation_options"]["beta"]}
    train, _ = target_data(config.data)
    rest, validation = hold_out(train, VALIDATION_FRACTION, config.data.seed)
    assert selection["validation_images"] == len(validation) and len(rest) + len(validation) == len(train)
    trial = json.loads((out / "selection" / "0" / "test.json").read_text())
    assert trial["protocol"]["test_images"] == len(validation) and trial["train_images"] == len(rest)
    assert record["train_images"] == len(train)  # the final run trains on every training image
    # Started runs are continued, not overwritten.
    assert cli.main(["--no-progress", "perturb", "transfer", "--out", str(out), "--preset", "transfer-quickstart"]) == 2


def test_the_candidate_with_the_best_validation_accuracy_wins_wherever_it_stands(tmp_path, monkeypatch):
    """Candidates whose validation accuracies differ (the middle one best, the last second): the
    middle one is chosen, recorded and used by the final run. The candidates' training is replaced
    by records of those accuracies; the final run trains for real. Catches "take the first" and
    "take the last" candidate, and the lowest accuracy (checked: each chooses another beta)."""
    from metareg.runs import transfer as transfer_module

    accuracy = {1e-5: 0.40, 1e-4: 0.65, 1e-3: 0.55}
    assert list(accuracy) == SELECTION_GRIDS["information-dropout"]["beta"]
    real_fit, trained = transfer_module.fit, []

    def fit(config, train, test, out, **kw):
        if out.parent.name != "selection":
            return real_fit(config, train, test, out, **kw)
        trained.append(config.perturb.options["beta"])
        record = {"mean": accuracy[config.perturb.options["beta"]], "scores": []}
        (out / "test.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(transfer_module, "fit", fit)
    out = tmp_path / "run"
    record = transfer(tiny_transfer("perturb.name=information-dropout", "select=true"), out, progress=False)
    assert trained == [1e-5, 1e-4, 1e-3]
    selection = json.loads((out / "selection.json").read_text())
    assert [c["validation_accuracy"] for c in selection["candidates"]] == [0.40, 0.65, 0.55]
    assert selection["chosen"] == {"beta": 1e-4} and record["perturbation_options"]["beta"] == 1e-4
    assert json.loads((out / "checkpoint.json").read_text())["config"]["perturb"]["options"]["beta"] == 1e-4


def test_a_partly_done_selection_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A selection interrupted inside its second candidate's run (after that run's step-3 checkpoint)
    and resumed: the finished first candidate is not trained again, the second continues from its
    checkpoint, the third starts; the candidates, the choice and the final network are bit-identical
    to an uninterrupted selection's."""
    from metareg.meta.ordinary import TransferTrainer

    config = tiny_transfer("perturb.name=information-dropout", "select=true", "against_base=false")
    transfer(config, tmp_path / "whole", progress=False)
    original, ran, interrupted = TransferTrainer.train_step, [], []

    def train_step(self, step):
        if (self.out.name, step) == ("1", 4) and not interrupted:
            interrupted.append(step)
            raise KeyboardInterrupt
        ran.append((self.out.relative_to(tmp_path / "cut").as_posix(), step))
        return original(self, step)

    monkeypatch.setattr(TransferTrainer, "train_step", train_step)
    with pytest.raises(KeyboardInterrupt):
        transfer(config, tmp_path / "cut", progress=False)
    assert ran == [("selection/0", s) for s in range(6)] + [("selection/1", s) for s in range(4)]
    assert not (tmp_path / "cut" / "selection.json").exists()
    ran.clear()
    transfer(config, tmp_path / "cut", resume=True, progress=False)
    assert ran == [("selection/1", s) for s in (3, 4, 5)] + [("selection/2", s) for s in range(6)] + [
        (".", s) for s in range(6)
    ]
    for name in ("selection.json", "test.json", *(f"selection/{i}/test.json" for i in range(3))):
        a, b = (json.loads((tmp_path / run / name).read_text()) for run in ("whole", "cut"))
        a.pop("training_seconds", None), b.pop("training_seconds", None)
        assert a == b, name
    for run in ("selection/1", "."):
        assert_same_tensors(tensors_of(tmp_path / "whole" / run), tensors_of(tmp_path / "cut" / run), TRANSFER_KEYS)
