"""`metareg reproduce`: grids of runs, resumable, with diverged runs reported as such."""

from metareg import reproduce
from metareg.reproduce import EXPERIMENTS, Experiment, Run, run_experiment


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
        "tiny", "tiny", "a test", (
            Run("ok", "sine-10shot", ("train.val_every=1000",), (10,), {10: "1.00 +- 0.10"}, row="a", column="x"),
            Run("boom", "sine-10shot", ("inner.lr=1.0e30", "train.log_every=1"), (10,), row="a", column="y"),
        ), ("x", "y"))
    monkeypatch.setitem(EXPERIMENTS, "tiny", experiment)
    text = run_experiment("tiny", tmp_path, iterations=3, episodes=4, jobs=1, progress=False).read_text()
    assert "diverged" in text and "[1.00 +- 0.10]" in text
    assert reproduce._cell(None, "diverged").startswith("diverged")
