"""Documentation that cannot rot: pytest runs the code of README.md, docs/ and the API docstrings.

With sybil's parsers:

* every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs, in page order, in one
  namespace per page, from a fresh temporary working folder. Sybil's own directive
  ``<!-- skip: next "reason" -->`` before a block skips it: only for blocks that need data that is
  not shipped or minutes of compute;
* every ``metareg ...`` command of a ```` ```bash ```` block (also ``torchrun ... -m metareg.cli``)
  must parse with the real argument parser, ``metareg.cli.build_parser()``: a renamed or removed
  flag fails here; every ```` ```yaml ```` block must be a valid config of ``metareg train`` in
  today's key names (no unknown key, no renamed one);
* every ```` ```python ```` block in a docstring of ``src/metareg`` runs (the examples of the
  Python API page), one namespace per source file.

Each page (or source file) is one test item, so a page's blocks always run together and in order,
also when pytest-xdist spreads the tests over processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import tempfile
import traceback
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Document, Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent


def pytest_configure() -> None:
    """Under pytest-xdist, share the cores among the workers instead of letting each take all of them.

    Every worker (and every ``metareg`` subprocess it starts, through ``OMP_NUM_THREADS``) otherwise
    runs as many intra-op threads as there are cores; two workers on two cores then oversubscribe, and
    OpenMP's spinning barriers made single tests up to 20x slower than alone (84 s instead of 4 s).
    """
    # A subprocess that dies of a signal (a rare SIGABRT of a gloo process at exit was seen once in
    # a full run) prints the Python stack of each thread, so the next failure says where.
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))  # set in xdist's workers only
    if not workers:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def commands(source: str) -> list[tuple[str, list[str]]]:
    """The ``metareg`` command lines of a shell block as (text, arguments after ``metareg``)."""
    found = []
    for line in source.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            try:
                words = shlex.split(part, comments=True)
            except ValueError as err:
                raise AssertionError(f"cannot split shell line {part.strip()!r}: {err}") from None
            for i, word in enumerate(words):
                if word == "metareg" or word.endswith("/metareg"):
                    found.append((part.strip(), words[i + 1 :]))
                    break
                if word == "-m" and i + 1 < len(words) and words[i + 1] == "metareg.cli":
                    found.append((part.strip(), words[i + 2 :]))
                    break
    return found


def check_commands(example: Example) -> None:
    """Every ``metareg`` command of the block parses with the CLI's parser."""
    from metareg.cli import build_parser

    for text, argv in commands(example.parsed):
        message = io.StringIO()
        try:
            with contextlib.redirect_stderr(message), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise AssertionError(
                    f"{example.path}, line {example.line}: `{text}` does not parse: {message.getvalue().strip()}"
                ) from None


def check_config(example: Example) -> None:
    """A YAML block is a valid (partial) config of ``metareg train``, in today's key names."""
    from metareg.config import Config, load_yaml, moved_keys
    from metareg.errors import ConfigError

    try:
        values = load_yaml(example.parsed)
        _, renamed = moved_keys(values, Config.kind)
        Config.from_dict(values)
    except ConfigError as err:
        raise AssertionError(f"{example.path}, line {example.line}: not a valid config: {err}") from None
    if renamed:
        stale = "; ".join(f"config key {old!r} is now {new!r}" for old, new in renamed)
        raise AssertionError(f"{example.path}, line {example.line}: {stale}")


MARKDOWN = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        SkipParser(),
        CodeBlockParser("bash", check_commands),
        CodeBlockParser("yaml", check_config),
    ],
    patterns=["README.md", "docs/*.md", "docs/*/*.md"],
    name="docs",
)
DOCSTRINGS = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["src/metareg/*.py", "src/metareg/*/*.py"],
    name="docstrings",
)


class Page(pytest.File):
    """A markdown page or a source file: one test running all its examples in order."""

    def __init__(self, *, sybil: Sybil, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sybil = sybil

    def collect(self):
        document = self.sybil.parse(self.path)
        if next(iter(document.examples()), None) is not None:
            yield PageExamples.from_parent(self, name="examples", document=document)


class PageExamples(pytest.Item):
    def __init__(self, *, document: Document, **kwargs) -> None:
        super().__init__(**kwargs)
        self.document = document

    def runtest(self) -> None:
        skipped, ran = [], 0
        with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
            for example in self.document.examples():
                self.current = example
                try:
                    example.evaluate()
                    ran += 1
                except SkipTest as why:
                    skipped.append(f"line {example.line}: {why}")
        if skipped and not ran:
            pytest.skip("; ".join(skipped))

    def repr_failure(self, excinfo, style=None) -> str:  # noqa: ARG002 (pytest's signature)
        """The block's place and the traceback inside the block and metareg (not sybil's or pytest's)."""
        example = self.current
        where = f"{Path(example.path).relative_to(ROOT)}, the block at line {example.line}"
        if isinstance(excinfo.value, AssertionError) and str(excinfo.value).startswith(str(example.path)):
            return f"{where}: {str(excinfo.value).split(': ', 1)[1]}"
        frames = [
            frame
            for frame in traceback.extract_tb(excinfo.tb)
            if frame.filename == example.path or "/metareg/" in frame.filename
        ]
        lines = "".join(traceback.format_list(frames))
        return f"{where} failed:\n{lines}{''.join(traceback.format_exception_only(excinfo.value))}"

    def reportinfo(self):
        return self.path, 0, f"{self.path.relative_to(ROOT)}: its code blocks"


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Page | None:
    for sybil in (MARKDOWN, DOCSTRINGS):
        if sybil.should_parse(file_path):
            return Page.from_parent(parent, path=file_path, sybil=sybil)
    return None
