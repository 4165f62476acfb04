"""Fuzzing the config layer (hypothesis, derandomized: the same examples on every run, a few
seconds): random keys, values, types and nesting, given the three ways a config arrives (``--set``
overrides, a config file, a stored config read back), for every kind of run. Each either resolves
to a valid config or fails with one line (a :class:`~metareg.errors.MetaregError` whose message is
a single line), never with another exception.

Mutations it catches (each tried): ``merge`` without its section check (``train=5`` resets the
section: caught by the validity re-check below), ``_build`` without the string-key check
(``difflib`` raises TypeError on ``{1: 2}``), ``_check_finite`` dropped (a NaN option slips into a
config that claims to be valid), ``create_model`` catching only TypeError (``channels: -4``: a
RuntimeError)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metareg.config import SCHEMAS, load_file, parse_assignment, validate
from metareg.errors import MetaregError
from metareg.runs.common import resolve


def _keys(schema: type, where: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(schema):
        hint = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(f"{where}{f.name}")
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{where}{f.name}.")
        elif hint is None and isinstance(default, dict):
            out += [f"{where}{f.name}.channels", f"{where}{f.name}.p", f"{where}{f.name}.num_classes"]
    return out


KEYS = sorted({k for schema in SCHEMAS.values() for k in _keys(schema)})
SETTINGS = settings(
    derandomize=True, database=None, max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, -1, 10**9, 2**63])
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


def works_or_one_line(build, check=validate) -> None:
    try:
        made, message = build(), None
    except MetaregError as err:
        made, message = None, str(err)
    if message is not None:
        assert message and "\n" not in message, message
    elif check is not None:
        check(made)  # what resolves is valid (no NaN, no section reset to a scalar, every range held)


@SETTINGS
@given(kind=st.sampled_from(sorted(SCHEMAS)), overrides=st.lists(st.tuples(keys, values), max_size=3))
def test_overrides_resolve_or_fail_in_one_line(kind, overrides):
    def build():
        parsed = [parse_assignment(f"{key}={json.dumps(value)}") for key, value in overrides]
        return resolve(None, None, parsed, schema=SCHEMAS[kind])

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
        validate(config)
        return config

    works_or_one_line(build)


@SETTINGS
@given(text=st.text(max_size=40))
def test_any_override_text_parses_or_fails_in_one_line(text):
    works_or_one_line(lambda: parse_assignment(text), check=None)


@SETTINGS
@given(text=st.text(max_size=60))
def test_any_config_file_text_loads_or_fails_in_one_line(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text)
        works_or_one_line(lambda: load_file(path), check=None)
