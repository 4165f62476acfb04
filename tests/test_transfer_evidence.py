"""``--against-base``: the perturbed network and the Base network on the same data and test images,
with the paired difference a user needs; MetaPerturb's diagnostics in the training log."""

from __future__ import annotations

import csv
import json
import math

import pytest

from helpers import flags, tiny_transfer
from metareg import cli

pytestmark = pytest.mark.slow  # every test here trains or tests runs, or starts processes


def test_against_base_trains_both_on_the_same_data_and_reports_the_paired_difference(tmp_path, capsys, monkeypatch):
    from metareg.meta import ordinary as transfer_module

    batches = {}  # (run folder, step) -> the labels of the training batch: the data order
    real = transfer_module.training_batch

    def spy(data, batch_size, step, seed, **kw):
        x, y = real(data, batch_size, step, seed, **kw)
        if kw["augment"]:  # a training step (the checkpoint check draws an unaugmented batch too)
            batches.setdefault(seed, []).append((step, y.clone()))
        return x, y

    monkeypatch.setattr(transfer_module, "training_batch", spy)
    out = tmp_path / "mp"
    args = [
        "--no-progress",
        "perturb",
        "transfer",
        "--out",
        str(out),
        *flags(
            [
                "data.image_size=16",
                "train.batch_size=8",
                "train.steps=6",
                "train.checkpoint_every=3",
                "model.options.channels=8",
                "perturb.mc_samples=3",
            ]
        ),
    ]
    assert cli.main(args) == 0  # the quickstart: against the Base network by default
    printed = capsys.readouterr().out
    base = tmp_path / "mp-base"
    a, b = json.loads((out / "test.json").read_text()), json.loads((base / "test.json").read_text())
    assert a["perturbation"] == "metaperturb" and b["perturbation"] == "none"
    assert a["protocol"] == {k: v for k, v in b["protocol"].items() if k != "mc_samples"} | {
        "mc_samples": 3
    }  # the same test images
    (steps,) = batches.values()  # one seed: both networks draw their batches from it
    assert [s for s, _ in steps] == list(range(6)) * 2
    assert all(x.equal(y) for (_, x), (_, y) in zip(steps[:6], steps[6:]))  # the same data order
    difference = next(line for line in printed.splitlines() if "- Base (paired" in line)
    assert cli.main(["--no-progress", "compare", str(out), str(base)]) == 0
    compared = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("A - B"))
    # The same numbers as `metareg compare` of the two run folders (percent there too).
    mean, ci = compared.split(": ")[1].split(" %")[0].split(" +- ")
    assert f"{float(mean):+.2f} +- {float(ci):.2f} points" in difference
    assert "final training accuracy" in printed and a["final_train_accuracy"] is not None


def test_metaperturbs_noise_and_scale_per_block_are_logged(tmp_path):
    from metareg.runs.transfer import transfer

    record = transfer(
        tiny_transfer("train.steps=4", "train.log_every=2", "perturb.phi=builtin"), tmp_path / "run", progress=False
    )
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    columns = [c for c in rows[0] if c[0] in "zs" and c[1:].isdigit()]
    assert sorted(columns) == sorted([f"z{i}" for i in range(4)] + [f"s{i}" for i in range(4)])  # Conv4: four blocks
    assert all(math.isfinite(float(row[c])) and float(row[c]) > 0 for row in rows for c in columns)
    assert record["perturbation"] == "metaperturb"
    from metareg.viz.curves import block_diagnostics, plot_curves, read_log

    assert block_diagnostics(read_log(tmp_path / "run")) == sorted(columns)

    assert plot_curves([tmp_path / "run"], tmp_path / "curves.png").stat().st_size > 5000  # transfer logs plot too
