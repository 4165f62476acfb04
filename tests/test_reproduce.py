"""`metareg reproduce`: grids of runs, resumable, with diverged runs reported as such."""

import json
import math
import re
import statistics

import pytest

from metareg.runs import reproduce
from metareg.runs.reproduce import EXPERIMENTS, Experiment, Run, run_experiment

pytestmark = pytest.mark.slow  # every test here trains or tests runs, or starts processes


def test_tiny_figure_run_writes_table_fractions_and_png(tmp_path):
    path = run_experiment("mtnet-figure-6.1", tmp_path, iterations=2, episodes=3, jobs=2, progress=False)
    text = path.read_text()
    assert "order 0, seed 2" in text and "| order 2 | 3 |" in text and "layers.0.weight" in text and "| all |" in text
    assert (tmp_path / "figure-6.1.png").exists()
    # A second call reuses everything: no run is trained again.
    logs = {p: p.stat().st_size for p in tmp_path.glob("*.log")}
    run_experiment("mtnet-figure-6.1", tmp_path, iterations=2, episodes=3, jobs=2, progress=False)
    assert {p: p.stat().st_size for p in tmp_path.glob("*.log")} == logs


def test_diverged_run_is_reported(tmp_path, monkeypatch):
    experiment = Experiment(
        "tiny",
        "tiny",
        "a test",
        (
            Run("ok", "sine-10shot", ("train.val_every=1000",), (10,), {10: "1.00 +- 0.10"}, row="a", column="x"),
            Run("boom", "sine-10shot", ("inner.lr=1.0e30", "train.log_every=1"), (10,), row="a", column="y"),
        ),
        ("x", "y"),
    )
    monkeypatch.setitem(EXPERIMENTS, "tiny", experiment)
    text = run_experiment("tiny", tmp_path, iterations=3, episodes=4, jobs=1, progress=False).read_text()
    assert "diverged" in text and "[1.00 +- 0.10]" in text
    assert reproduce._cell(None, "diverged").startswith("diverged")


def test_metaperturb_grid_trains_phi_first_and_reports_seeds_with_paired_differences(tmp_path, monkeypatch):
    """A tiny MetaPerturb grid on glyphs: phi (stage 0), then Base and MetaPerturb transfers that
    use it ({out}), two seeds each; the report gives mean +- std over seeds and paired differences."""
    tiny_meta = (
        "data.options={num_classes: 20}",
        "data.classes=20",
        "data.image_size=16",
        "train.batch_size=4",
        "tasks=4",
        "model.options={channels: 8}",
    )
    tiny_transfer = ("data.image_size=16", "train.batch_size=8", "model.options={channels: 8}", "perturb.mc_samples=2")
    runs = [Run("phi", "perturb-quickstart", tiny_meta, row="phi", command="meta-train", stage=0)]
    for seed in (0, 1):
        runs += [
            Run(
                f"base-{seed}",
                "transfer-quickstart",
                (*tiny_transfer, "perturb.name=none"),
                row="conv4",
                column="Base",
                seed=seed,
                command="transfer",
            ),
            Run(
                f"mp-{seed}",
                "transfer-quickstart",
                (*tiny_transfer, "perturb.phi={out}/phi"),
                row="conv4",
                column="MetaPerturb",
                seed=seed,
                command="transfer",
            ),
        ]
    monkeypatch.setitem(
        EXPERIMENTS,
        "tiny-mp",
        Experiment("tiny-mp", "tiny", "a test", tuple(runs), ("Base", "MetaPerturb"), figure="seeds"),
    )
    text = run_experiment("tiny-mp", tmp_path, iterations=3, jobs=2, progress=False).read_text()
    assert "| conv4 | " in text and "MetaPerturb - Base" in text and text.count("+-") >= 5, text
    assert (tmp_path / "phi" / "phi.json").exists() and (tmp_path / "mp-1" / "test.json").exists()
    phi = str(tmp_path / "phi")
    assert json.loads((tmp_path / "mp-0" / "test.json").read_text())["phi"]["path"].startswith(phi)
    check_seed_row(
        text,
        "conv4",
        *(
            {s: json.loads((tmp_path / f"{name}-{s}" / "test.json").read_text()) for s in (0, 1)}
            for name in ("base", "mp")
        ),
    )


NUMBER = r"([+-]?\d+\.\d+)"


def close(reported: str, expected: float) -> bool:
    """A number printed with 2 decimals is the expected one (sign included)."""
    return abs(float(reported) - expected) <= 0.005 + 1e-9


def check_seed_row(text: str, row: str, base: dict[int, dict], perturbed: dict[int, dict]) -> None:
    """The row's cells, recomputed from the runs' test.json: accuracy in % as mean +- std over seeds
    (sample std) with each seed's value, and MetaPerturb - Base: each seed's paired mean difference
    +- its 95% CI (1.96 std / sqrt(n) over the test images), then their mean +- std over seeds."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row} |"))
    cells = [c.strip() for c in line.strip().strip("|").split("|")][1:]
    assert len(cells) == 3, line
    seeds = sorted(base)
    for cell, runs in zip(cells[:2], (base, perturbed)):
        values = [100 * runs[s]["mean"] for s in seeds]
        assert abs(values[0] - values[1]) >= 0.02, values  # a spread whose std shows
        m = re.fullmatch(rf"{NUMBER} \+- {NUMBER} \[(.*)\]", cell)
        assert m, cell
        assert close(m[1], statistics.fmean(values)) and close(m[2], statistics.stdev(values)), (cell, values)
        each = m[3].split(", ")
        assert len(each) == len(values) and all(close(r, v) for r, v in zip(each, values)), cell
    diffs, cis = [], []
    for s in seeds:
        d = [a - b for a, b in zip(perturbed[s]["scores"], base[s]["scores"])]  # paired over the same test images
        diffs.append(100 * statistics.fmean(d))
        cis.append(100 * 1.96 * statistics.stdev(d) / math.sqrt(len(d)))
    assert any(abs(d) >= 0.01 for d in diffs), diffs  # a difference whose sign shows
    assert abs(diffs[0] - diffs[1]) >= 0.02, diffs  # and a spread over seeds that shows (sample vs population std)
    m = re.fullmatch(rf"{NUMBER} \+- {NUMBER} \[(.*)\]", cells[2])
    assert m and m[1][0] in "+-", cells[2]
    assert close(m[1], statistics.fmean(diffs)) and close(m[2], statistics.stdev(diffs)), (cells[2], diffs)
    per_seed = re.findall(rf"{NUMBER} \+- {NUMBER}", m[3])
    assert len(per_seed) == len(seeds), cells[2]
    for (d_text, ci_text), d, ci in zip(per_seed, diffs, cis):
        assert d_text[0] in "+-" and close(d_text, d) and close(ci_text, ci), (cells[2], diffs, cis)


def test_a_time_budget_stops_the_grid_and_the_next_call_continues_it(tmp_path, monkeypatch):
    """`metareg reproduce --time-budget`: runs stop with checkpoints, the report marks them
    unfinished; the same call again finishes them, with the weights of an uninterrupted run."""
    import time

    from helpers import assert_same_tensors, final_params

    run = Run("sine", "sine-10shot", ("train.val_every=1000", "train.checkpoint_every=5"), (10,), row="a", column="x")
    monkeypatch.setitem(EXPERIMENTS, "tiny-budget", Experiment("tiny-budget", "tiny", "a test", (run,), ("x",)))
    text = run_experiment(
        "tiny-budget",
        tmp_path / "cut",
        iterations=150,
        episodes=4,
        jobs=1,
        progress=False,
        deadline=time.monotonic() + 1.5,
    ).read_text()
    assert "unfinished" in text
    step = json.loads((tmp_path / "cut" / "sine" / "checkpoint.json").read_text())["step"]
    assert 0 < step < 150
    text = run_experiment(
        "tiny-budget", tmp_path / "cut", iterations=150, episodes=4, jobs=1, progress=False
    ).read_text()
    assert "unfinished" not in text
    run_experiment("tiny-budget", tmp_path / "whole", iterations=150, episodes=4, jobs=1, progress=False)
    assert_same_tensors(final_params(tmp_path / "whole" / "sine"), final_params(tmp_path / "cut" / "sine"))
