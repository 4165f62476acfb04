"""The machinery that keeps the documentation true: the generated pages cover everything they
claim to, and the code-block checks of the root ``conftest.py`` fail on what they must catch."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
from sybil import Document
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

import metareg
from metareg.cli import build_parser
from metareg.runs.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = load("docs_hooks", REPO / "docs" / "hooks.py")
BLOCKS = load("docs_blocks", REPO / "conftest.py")


def walk(parser: argparse.ArgumentParser, path: str):
    """(command path, option strings) of the parser and every sub-command, independently of the hook."""
    yield path, [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def test_the_cli_reference_has_every_command_and_every_flag():
    """Mutations caught: a sub-command level not walked (``metareg perturb transfer``), flags of a
    command left out, a choice list dropped, ``<name>`` in help text left unescaped."""
    text = HOOKS.cli_reference()
    commands = list(walk(build_parser(), "metareg"))
    assert len(commands) >= 14  # metareg, 10 commands, perturb meta-train / transfer / info
    for path, flags in commands[1:]:
        section = text.split(f"`{path}`\n", 1)
        assert len(section) == 2, f"no section for {path}"
        body = section[1].split("\n#", 1)[0]
        for flag in flags:
            assert f"`{flag}`" in body or f"`{flag}`," in body, f"{path}: {flag} missing"
    assert "`{fgsm,pgd-linf,pgd-l2,pgd-l1}`" in text
    assert "&lt;name&gt;" in text  # help text's <name> escaped, not swallowed as an HTML tag


def test_the_api_page_lists_every_public_name_and_the_presets_table_every_preset():
    api = HOOKS.api_reference()
    for name in metareg.__all__:
        if not name.startswith("_"):
            assert f"::: metareg.{name}\n" in api + "\n", name
    table = HOOKS.presets_table()
    for name in PRESETS:
        assert f"| `{name}` |" in table


def test_markers_are_replaced_and_unknown_markers_are_errors():
    page = "# x\n\n<!-- generated: presets -->\n"
    assert "<!-- generated" not in HOOKS.on_page_markdown(page)
    with pytest.raises(ValueError, match="unknown generated section 'nope'"):
        HOOKS.on_page_markdown("<!-- generated: nope -->\n")


def test_rst_roles_of_docstrings_become_plain_code():
    """``:class:`~a.b.C``` shows as ``C``, ``:func:`a.b``` as ``a.b`` (as Sphinx would)."""
    html = "see :class:<code>~metareg.inner.InnerRule</code> and :func:<code>metareg.attach</code>"
    assert HOOKS.on_page_content(html) == "see <code>InnerRule</code> and <code>metareg.attach</code>"


def test_commands_are_found_in_shell_lines():
    text = (
        "metareg train --preset quickstart --steps 3   # a comment --nope\n"
        ".venv/bin/metareg bench && metareg presets\n"
        "torchrun --standalone --nproc_per_node 2 -m metareg.cli test --checkpoint runs/x \\\n"
        "    --episodes 10\n"
        "python3 -m venv .venv && .venv/bin/pip install -e .\n"
    )
    assert [argv for _, argv in BLOCKS.commands(text)] == [
        ["train", "--preset", "quickstart", "--steps", "3"],
        ["bench"],
        ["presets"],
        ["test", "--checkpoint", "runs/x", "--episodes", "10"],
    ]


def page(tmp_path: Path, text: str) -> Document:
    path = tmp_path / "page.md"
    path.write_text(text)
    parsers = [
        PythonCodeBlockParser(),
        SkipParser(),
        CodeBlockParser("bash", BLOCKS.check_commands),
        CodeBlockParser("yaml", BLOCKS.check_config),
    ]
    return Document.parse(str(path), *parsers)


def evaluate_all(document: Document) -> None:
    for example in document.examples():
        try:
            example.evaluate()
        except BaseException as err:
            if type(err).__name__ != "SkipTest":
                raise


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("```bash\nmetareg train --stepz 3\n```\n", "unrecognized arguments: --stepz"),
        ("```bash\nmetareg trian\n```\n", "invalid choice: 'trian'"),
        ("```yaml\ninner: {stepz: 3}\n```\n", "not a valid config"),
        ("```yaml\ntrain: {iterations: 3}\n```\n", "'train.iterations' is now 'train.steps'"),
        ('```python\nassert 1 + 1 == 3, "stale"\n```\n', "stale"),
    ],
)
def test_a_stale_block_fails(tmp_path, block, message):
    """Each kind of block that went stale fails its page: a renamed or misspelt flag, an unknown or
    a renamed config key, Python that no longer runs. Mutations caught: the parser's exit status
    ignored, the renamed-key notice ignored."""
    with pytest.raises(AssertionError, match=message):
        evaluate_all(page(tmp_path, block))


def test_good_blocks_pass_and_skipped_blocks_do_not_run(tmp_path):
    evaluate_all(
        page(
            tmp_path,
            "```bash\nmetareg train --preset quickstart --set inner.lr=0.1 --steps 3 --out runs/q\n```\n\n"
            "```yaml\ninner: {lr: 0.1, transforms: [{name: dropgrad, p: 0.1}]}\n```\n\n"
            "```python\nx = 2\n```\n\n"
            '<!-- skip: next "needs data" -->\n```python\nraise RuntimeError("must not run")\n```\n\n'
            "```python\nassert x == 2  # one namespace per page\n```\n",
        )
    )


def test_the_readme_stays_short():
    """The README is the front page: the two commands, a tour, an API example, the methods, links."""
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move details into docs/"
