"""Configs: presets, files, overrides, and the errors a typo gets."""

import json

import pytest

from metareg.config import SCHEMAS, Config, moved_keys, parse_assignment
from metareg.errors import ConfigError
from metareg.runs.common import resolve
from metareg.runs.presets import PRESETS


def test_every_preset_resolves_and_names_its_paper_row():
    schemas = SCHEMAS
    for name, preset in PRESETS.items():
        config = resolve(name, schema=schemas[preset.kind])
        assert config.preset == name
        assert preset.paper


def test_every_preset_uses_todays_key_names_and_long_ones_have_a_measured_cost():
    """A preset written with a renamed key would print a notice on every run and break what reads its
    values directly (``reproduce --plan`` reads ``train.steps``). Caught: miniimagenet-5w1s-resnet12
    with ``train.iterations`` / ``train.meta_lr``."""
    from metareg.runs.costs import MEASURED

    for name, preset in PRESETS.items():
        assert moved_keys(preset.values, preset.kind)[1] == [], name
        assert not preset.timing or preset.timing in MEASURED, (name, preset.timing)


def test_a_preset_of_another_kind_names_the_command_that_runs_it():
    with pytest.raises(ConfigError, match="metareg perturb meta-train"):
        resolve("perturb-quickstart")
    with pytest.raises(ConfigError, match="metareg train"):
        resolve("quickstart", schema=SCHEMAS["transfer"])


def test_omniglot_preset_has_the_reference_readme_hyperparameters():
    c = resolve("omniglot-20w1s")
    assert (c.data.way, c.data.shot, c.data.query) == (20, 1, 15)
    assert (c.inner.lr, c.inner.steps, c.train.meta_batch, c.train.lr, c.train.steps, c.train.clip) == (
        0.1,
        5,
        4,
        3e-4,
        60000,
        3.0,
    )
    assert c.data.train_split == "trainval"
    c = resolve("miniimagenet-5w5s-metasgd")
    assert (c.inner.step, c.inner.lr, c.train.lr, c.model.options["channels"]) == ("meta-sgd", 0.01, 1e-4, 32)


def test_sine_preset_follows_the_thesis():
    c = resolve("sine-10shot")
    assert (c.data.shot, c.inner.lr, c.inner.steps, c.train.meta_batch, c.train.steps, c.train.lr) == (
        10,
        0.01,
        1,
        4,
        60000,
        1e-3,
    )
    assert c.model.options["hidden"] == [40, 40]


def test_file_and_overrides_merge_over_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 0.2\ntrain:\n  iterations: 7\n")
    c = resolve(
        "quickstart", path, [parse_assignment("train.steps=9"), parse_assignment("model.options={channels: 8}")]
    )
    assert c.inner.lr == 0.2 and c.train.steps == 9 and c.model.options == {"channels": 8}
    assert c.data.name == "glyphs"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"stesp": 5}}, "unknown config key 'train.stesp' (did you mean 'train.steps'?)"),
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"inner": {"lr": "fast"}}, "'inner.lr' must be"),
        ({"train": {"meta_batch": 0}}, "train.meta_batch must be >= 1"),
        ({"data": {"way": True}}, "'data.way' must be"),
        ({"train": 3}, "must be a mapping"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, values, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as err:
        resolve(None, path)
    assert message in str(err.value)


def test_unknown_preset_and_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(None, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(None, tmp_path / "missing.yaml")


def test_round_trip():
    c = resolve("sine-10shot-metasgd")
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_transfer_presets_of_paper_rows_use_the_released_schedule_and_say_their_cost():
    from metareg.config import TransferConfig

    rows = [p for p in PRESETS.values() if p.kind == "transfer" and "Table" in p.paper]
    assert len(rows) == 7
    for preset in rows:
        c = resolve(preset.name, schema=TransferConfig)
        assert (
            c.train.steps,
            c.train.batch_size,
            c.train.milestones,
            c.train.gamma,
            c.perturb.mc_samples,
            c.perturb.anneal,
        ) == (10000, 128, [0.4, 0.7, 0.9], 0.3, 100, 0.4), preset.name
        assert "CPU cores" in preset.cost


def test_numbers_in_exponent_form_are_numbers_at_any_depth(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string: a nested option would reach the code as "1e-05".
    from metareg.config import load_file

    assert parse_assignment("perturb.options={beta: 1e-05, p: 2E+1, name: 1e5x}") == {
        "perturb": {"options": {"beta": 1e-05, "p": 20.0, "name": "1e5x"}}
    }
    assert parse_assignment("train.lr=1e-3") == {"train": {"lr": 1e-3}}
    path = tmp_path / "c.yaml"
    path.write_text("perturb:\n  options: {beta: 1e-5}\noptim:\n  lr: -3e-4\n  steps: 10\n")
    assert load_file(path) == {"perturb": {"options": {"beta": 1e-5}}, "optim": {"lr": -3e-4, "steps": 10}}


def test_keys_of_earlier_versions_are_read_under_their_new_names(tmp_path, capsys, monkeypatch):
    """Old run folders and config files keep working: each renamed key is read as its new name with
    a one-line notice; giving both names is refused. (Mutation: dropping a RENAMED entry fails here.)"""
    from metareg import config as config_module
    from metareg.config import MetaTrainConfig, TransferConfig, upgrade

    monkeypatch.setattr(config_module, "_noticed", set())

    old = {
        "model": {"perturbation": "meta-dropout", "perturbation_options": {"init_std": 0.1}},
        "train": {"iterations": 7, "meta_lr": 0.5},
    }
    c = Config.from_dict(upgrade(old, "bilevel"))
    assert (c.perturb.name, c.perturb.options, c.train.steps, c.train.lr) == ("meta-dropout", {"init_std": 0.1}, 7, 0.5)
    Config.from_dict(upgrade(old, "bilevel"))  # the notice is printed once per key and process
    notes = capsys.readouterr().err.splitlines()
    assert "metareg: note: config key 'train.iterations' is now 'train.steps' (read as such)" in notes
    assert len(notes) == 4, notes
    m = MetaTrainConfig.from_dict({"optim": {"steps": 3, "lr": 0.1}, "strategy": "loop"})
    assert (m.train.steps, m.train.lr, m.train.strategy) == (3, 0.1, "loop")
    t = TransferConfig.from_dict({"optim": {"batch_size": 16}})
    assert t.train.batch_size == 16 and t.train.steps == TransferConfig().train.steps
    with pytest.raises(ConfigError, match="same key"):
        Config.from_dict({"train": {"iterations": 7, "steps": 8}})
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  iterations: 5\n")
    assert resolve("quickstart", path, [parse_assignment("train.meta_lr=0.01")]).train.lr == 0.01
