"""Every experiment of the seeds has a command: the presets of DropGrad's Tables 1-4, MAML++'s rows,
MetaPerturb's Table 3 and MT-net's Table 6.3 resolve and train 2 iterations (tiny overrides); each
grid prints its plan with measured costs and a labelled GPU estimate; `metareg presets` and
`metareg reproduce --help` list every seed table."""

from __future__ import annotations

import json

import pytest

from helpers import cli_subprocess
from metareg.config import SCHEMAS, parse_assignment
from metareg.runs import KINDS
from metareg.runs.common import resolve
from metareg.runs.costs import MEASURED
from metareg.runs.presets import PRESETS
from metareg.runs.reproduce import EXPERIMENTS, plan

NEW_PRESETS = sorted(
    name
    for name in PRESETS
    if name.startswith(("dropgrad-", "mtnet-", "perturb-tinyimagenet-resnet20-")) or name.endswith("-mamlpp")
)
SEED_TABLES = {
    "dropgrad-table-1": "DropGrad Table 1",
    "dropgrad-table-2": "DropGrad Table 2",
    "dropgrad-table-3": "DropGrad Table 3",
    "dropgrad-table-4": "DropGrad Table 4",
    "metaperturb-table-3": "MetaPerturb Table 3",
    "metaperturb-figure-8": "MetaPerturb Figure 8",
    "mtnet-table-6.3": "MT-net thesis Table 6.3",
}


def _tiny(name: str) -> list[str]:
    """Overrides that keep a preset's method and make it run in a second on the built-in glyphs."""
    preset = PRESETS[name]
    options = dict(preset.values["model"].get("options", {}))
    backbone = preset.values["model"]["backbone"]
    options |= {"widths": [4, 8, 8, 8]} if backbone == "resnet18" else {"blocks": [1, 1, 1]}
    if backbone == "conv4":
        options = dict(preset.values["model"]["options"]) | {"channels": 4}
    common = ["data.name=glyphs", "data.image_size=16", f"model.options={json.dumps(options)}", "train.steps=2"]
    if preset.kind == "bilevel":
        return [
            *common,
            "data.options={num_classes: 20}",
            "data.train_split=train",
            "data.val_split=null",
            "data.test_name=null",
            "data.way=2",
            "data.shot=1",
            "data.query=1",
            "model.init_from=null",
            "train.meta_batch=1",
            "eval.episodes=2",
        ]
    if preset.kind == "meta-train":
        return [*common, "data.options={num_classes: 8}", "data.classes=8", "train.batch_size=2", "tasks=2"]
    return [*common, "data.options={num_classes: 4}", "data.train_per_class=4", "train.batch_size=4"]


def test_the_seed_tables_have_presets():
    """Table 1 (8 rows x 2 shots), Table 2 (4 layer choices), Table 3 (4 settings x 2), Table 4
    (11 rows x 2 shots), MAML++'s 3 rows, the pre-training, MetaPerturb's 6 ablations, MT-net's 9 cells."""
    assert len(NEW_PRESETS) == 16 + 4 + 8 + 22 + 3 + 1 + 6 + 9
    for name in NEW_PRESETS:
        assert PRESETS[name].timing, name  # every one names its measured cost


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_every_new_preset_resolves_and_trains_two_iterations(name, tmp_path):
    preset = PRESETS[name]
    full = resolve(name, None, [], SCHEMAS[preset.kind])
    assert full.train.steps >= 750  # the paper schedule, not a tiny one
    config = resolve(name, None, [parse_assignment(o) for o in _tiny(name)], SCHEMAS[preset.kind])
    out = KINDS[preset.kind].run(config, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoint.json").is_file()
    if preset.kind == "bilevel":
        assert out.step == 2


@pytest.mark.parametrize("experiment", sorted(SEED_TABLES))
def test_every_grid_prints_its_plan_with_measured_costs(experiment, tmp_path):
    text = plan(experiment, tmp_path)
    assert f"{experiment}: {len(EXPERIMENTS[experiment].runs)} runs" in text
    assert "not timed" not in text, text  # every run's preset has a measured rate
    assert "s/iteration (measured for" in text and "ESTIMATE, not a measurement" in text
    assert "--time-budget" in text
    for run_ in EXPERIMENTS[experiment].runs:
        assert PRESETS[run_.preset].timing in MEASURED


def test_grid_rows_name_their_paper_numbers():
    """Every episodic cell carries the paper's number of its preset (the report prints it in brackets)."""
    for experiment in ("dropgrad-table-1", "dropgrad-table-2", "dropgrad-table-3", "dropgrad-table-4"):
        cells = [r for r in EXPERIMENTS[experiment].runs if r.command == "train"]
        assert cells and all(r.paper for r in cells), experiment
    mtnet = {(r.row, r.column): r.paper[1] for r in EXPERIMENTS["mtnet-table-6.3"].runs}
    assert mtnet[("MT-net", "miniImageNet 5-way 1-shot")] == "51.70 +- 1.84"
    table1 = {(r.row, r.column): r.paper[r.shots[0]] for r in EXPERIMENTS["dropgrad-table-1"].runs if r.paper}
    assert table1[("MAML++ w/ Gaussian DropGrad", "5-shot")] == "69.80 +- 0.46"
    assert table1[("MetaSGD*", "1-shot")] == "60.44 +- 0.87"


def test_presets_and_reproduce_help_list_every_seed_table():
    listing = cli_subprocess("presets").stdout
    for table in (*SEED_TABLES.values(), "MAML++ paper Table 1", "MAML++ paper Table 2"):
        assert table in listing, table
    assert "Table 5" not in listing  # tracking and viewpoint estimation are other fields (README)
    usage = cli_subprocess("reproduce", "--help").stdout
    for name in SEED_TABLES:
        assert name in usage, name
