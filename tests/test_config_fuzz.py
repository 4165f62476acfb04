"""Fuzzing the config layer (hypothesis, derandomized: the same examples on every run, about ten
seconds): random keys, values, types and nesting, given the three ways a config arrives (``--set``
overrides, a config file, a stored config read back), for every kind of run. Each either resolves
or fails with one line (a :class:`~metareg.errors.MetaregError` whose message is a single line),
never with another exception; and what resolves is plain, finite JSON (what a run stores) in
which no section was replaced by a value.

Mutations it catches (each tried): ``_build`` without its string-key check (``difflib`` raised
TypeError on ``{0: None}``), ``merge`` without its section check (``train=5`` then ``train.steps=1``
silently reset the section), ``_check_finite`` walking nothing (a NaN or a date in the resolved
config), ``create_model`` catching TypeError only (``channels: -1``: a RuntimeError),
``_check_finite`` without its plain-value check (``!!set {a}``: a set in the stored config)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metareg.config import SCHEMAS, load_file, parse_assignment
from metareg.errors import MetaregError
from metareg.runs.common import resolve


def _keys(schema: type, where: str = "") -> tuple[list[str], list[str]]:
    """(every dotted key of a schema, with a few option names; the keys that are sections)."""
    keys, sections = [], []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys.append(f"{where}{f.name}")
        if dataclasses.is_dataclass(default):
            sections.append(f"{where}{f.name}")
            inner, inner_sections = _keys(type(default), f"{where}{f.name}.")
            keys, sections = keys + inner, sections + inner_sections
        elif isinstance(default, dict):
            keys += [f"{where}{f.name}.{option}" for option in ("channels", "p", "num_classes", "hidden")]
    return keys, sections


KEYS = sorted({k for schema in SCHEMAS.values() for k in _keys(schema)[0]})
SECTIONS = sorted({k for schema in SCHEMAS.values() for k in _keys(schema)[1]})
SETTINGS = settings(
    derandomize=True, database=None, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, -1, -4, 10**9, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["conv4", "mlp", "glyphs", "none", "dropout", "auto", "loop", "float64", "sgd"])
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(KEYS) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=12)
# YAML that builds values JSON has no word for (a set), or none at all
yaml_values = st.sampled_from(["2001-01-01", "2001-02-30", "!!set {a}", "[", "{a: {b: [1, {c: .nan}]}}", "1e-5", ""])
# A valid key of each section: after the section was set to a value, it would reset the section to its defaults.
SECTION_KEY = {"data": "train_split=train", "model": "backbone=conv4", "perturb": "name=none", "inner": "steps=2"}
SECTION_KEY |= {"train": "log_every=10", "eval": "episodes=10"}
section_then_key = st.tuples(st.sampled_from(sorted(SECTION_KEY)), leaves).map(
    lambda t: [(t[0], json.dumps(t[1])), (f"{t[0]}.{SECTION_KEY[t[0]].split('=')[0]}", SECTION_KEY[t[0]].split("=")[1])]
)
OPTIONS = [k for k in KEYS if ".options." in k]
FLOATS = ["inner.lr", "train.lr", "train.clip", "train.weight_decay", "train.gamma", "train_fraction"]
targeted = (
    st.tuples(st.sampled_from(OPTIONS), (st.integers(-5, 3) | leaves).map(json.dumps))  # options' values and types
    | st.tuples(st.sampled_from(FLOATS + OPTIONS), st.sampled_from([".nan", ".inf", "-.inf", "NaN"]))
    | st.tuples(st.sampled_from(OPTIONS + KEYS), yaml_values)
    | st.tuples(st.just("model.options"), st.sampled_from(["{channels: -4}", "{channels: 0}", "{hidden: [-3]}"]))
)
assignments = (
    st.lists(st.tuples(keys, values.map(json.dumps)) | targeted, max_size=3)
    | section_then_key
    | st.lists(targeted, min_size=1, max_size=2)
)


def plain_json(config) -> None:
    """What resolves is finite, plain JSON, as the run will store it (independent of the checks)."""
    json.dumps(config.to_dict(), allow_nan=False)


def works_or_one_line(build, check=plain_json) -> None:
    try:
        made, message = build(), None
    except MetaregError as err:
        made, message = None, str(err)
    if message is not None:
        assert message and "\n" not in message, message
    elif check is not None:
        check(made)


@SETTINGS
@given(kind=st.sampled_from(sorted(SCHEMAS)), overrides=assignments)
def test_overrides_resolve_or_fail_in_one_line(kind, overrides):
    replaced = [key for key, text in overrides if key in SECTIONS and not text.lstrip().startswith("{")]

    def build():
        config = resolve(
            None, None, [parse_assignment(f"{key}={text}") for key, text in overrides], schema=SCHEMAS[kind]
        )
        # a section given as a value is refused, never read as "the defaults"
        assert not [k for k in replaced if k.split(".")[0] in {f.name for f in dataclasses.fields(SCHEMAS[kind])}]
        return config

    works_or_one_line(build)


@SETTINGS
@given(kind=st.sampled_from(sorted(SCHEMAS)), values=st.dictionaries(keys | st.integers(), values, max_size=4))
def test_config_files_resolve_or_fail_in_one_line(kind, values):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        works_or_one_line(lambda: resolve(None, path, schema=SCHEMAS[kind]))


@SETTINGS
@given(kind=st.sampled_from(sorted(SCHEMAS)), values=values)
def test_stored_configs_read_back_or_fail_in_one_line(kind, values):
    def build():
        config = SCHEMAS[kind].from_dict(values)
        from metareg.config import validate

        validate(config)
        return config

    works_or_one_line(build)


@SETTINGS
@given(text=st.text(max_size=40) | yaml_values.map(lambda v: f"x={v}"))
def test_any_override_text_parses_or_fails_in_one_line(text):
    works_or_one_line(lambda: parse_assignment(text), check=None)


@SETTINGS
@given(text=st.text(max_size=60) | yaml_values.map(lambda v: f"train: {v}"))
def test_any_config_file_text_loads_or_fails_in_one_line(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text)
        works_or_one_line(lambda: load_file(path), check=None)
