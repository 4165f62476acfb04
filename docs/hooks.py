"""mkdocs hooks: the pages that are generated from the code at build time, so they cannot rot.

* ``<!-- generated: cli -->`` becomes the reference of every ``metareg`` command, walked from
  ``metareg.cli.build_parser()`` (usage, help and every flag with its default and choices);
* ``<!-- generated: api -->`` becomes one mkdocstrings block per name of ``metareg.__all__``;
* ``<!-- generated: presets -->`` becomes the table of every preset and the paper row it reproduces
  (``metareg.runs.presets.PRESETS``, the same text ``metareg presets`` prints).

It also drops the reStructuredText roles (``:class:``, ``:func:``, ...) that the docstrings use for
Python's ``help()``, keeping their code text.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

MARKER = re.compile(r"^<!-- generated: (\w+) -->$", re.MULTILINE)


# ------------------------------------------------------------------------------------- the CLI
def _cell(text: str) -> str:
    """One table cell: one line, ``|`` escaped, ``<`` and ``>`` escaped outside code spans."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;").replace(">", "&gt;") for i, part in enumerate(parts))


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None:
        value = "{" + ",".join(map(str, action.choices)) + "}"
        if len(value) > 40:
            value = (action.metavar or action.dest).upper()
    else:
        value = action.metavar or action.dest.upper()
    if action.nargs in ("+", "*"):
        value = f"{value} ..."
    elif isinstance(action.nargs, int) and action.nargs > 1:
        value = " ".join([value] * action.nargs)
    return f"{names} `{value}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    extra = []
    if action.choices is not None and len(str(action.choices)) > 40:
        extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0 and "default" not in text:
        extra.append(f"default `{action.default}`")
    if action.required and action.option_strings:
        extra.append("required")
    return _cell("; ".join([text, *extra]) if text else "; ".join(extra))


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _command(name: str, text: str, parser: argparse.ArgumentParser, depth: int) -> list[str]:
    out = [f"{'#' * depth} `{name}`", ""]
    description = parser.description or text
    if description:
        out += [_cell(description.replace("%%", "%")), ""]
    usage = parser.format_usage().removeprefix("usage: ").strip()
    out += ["```text", " ".join(usage.split()), "```", ""]
    rows = [
        f"| {_flags(a)} | {_help(parser, a)} |"
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
    ]
    if rows:
        out += ["| argument | meaning |", "|---|---|", *rows, ""]
    for sub_name, sub_text, sub in _subcommands(parser):
        out += _command(f"{name} {sub_name}", sub_text, sub, depth + 1)
    return out


def cli_reference() -> str:
    """Markdown of every command of ``metareg.cli.build_parser()``."""
    import os

    os.environ.setdefault("COLUMNS", "100")  # argparse wraps usage lines to the terminal's width
    from metareg.cli import build_parser

    parser = build_parser()
    out = [_cell(parser.description), "", "Options before the command:", ""]
    out += ["| argument | meaning |", "|---|---|"]
    out += [
        f"| {_flags(a)} | {_help(parser, a)} |"
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
    ]
    out.append("")
    for name, text, sub in _subcommands(parser):
        out += _command(f"metareg {name}", text, sub, 2)
    return "\n".join(out)


# ---------------------------------------------------------------------------------- the Python API
def api_reference() -> str:
    """One mkdocstrings block per public name, in the order of ``metareg.__all__``."""
    import metareg

    names = [name for name in metareg.__all__ if not name.startswith("_")]
    return "\n\n".join(f"::: metareg.{name}" for name in names)


# ------------------------------------------------------------------------------------- the presets
def presets_table() -> str:
    """Every preset with the paper row it reproduces and the command that runs it."""
    from metareg.runs.presets import PRESETS

    command = {
        "bilevel": "metareg train",
        "meta-train": "metareg perturb meta-train",
        "transfer": "metareg perturb transfer",
    }
    rows = ["| preset | what | reproduces (paper's number) | run with |", "|---|---|---|---|"]
    for preset in PRESETS.values():
        cost = f" ({preset.cost})" if preset.cost else ""
        rows.append(
            f"| `{preset.name}` | {_cell(preset.description)} | {_cell(preset.paper)}{_cell(cost)} "
            f"| `{command.get(preset.kind, preset.kind)}` |"
        )
    return "\n".join(rows)


GENERATORS = {"cli": cli_reference, "api": api_reference, "presets": presets_table}


def on_page_markdown(markdown: str, **_) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated section {name!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(?:~(?:\w+\.)*)?")


def on_page_content(html: str, **_) -> str:
    """``:class:`~metareg.x.Name``` (rendered ``:class:<code>~metareg.x.Name</code>``) -> ``Name``."""
    return ROLE.sub("<code>", html)
