"""Hyperparameter selection of the transfer baselines (``metareg perturb transfer --select``): each
candidate of the perturbation's grid trains on the training images less a held-out validation split,
the best validation accuracy wins, and the run then trains on every training image with it."""

from __future__ import annotations

import json

from helpers import tiny_transfer
from metareg import cli
from metareg.data.labeled import hold_out
from metareg.runs.transfer import SELECTION_GRIDS, VALIDATION_FRACTION, target_data, transfer


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
