"""The paper-scale runs that accumulate across GPU windows (``gpu-runs/`` in the repository).

A GPU is lent only now and then, for minutes: each window (``benchmarks/gpu_run.sh``) continues
these runs for the time it has left, from the committed folder or from a copy further along in
``../shared/gpu-runs/``, and packs them; after the window ``python benchmarks/gpu_runs.py collect
TAR`` unpacks them into ``gpu-runs/`` and rewrites ``gpu-runs/README.md`` (iterations done of the
target, GPU minutes spent, the machines that ran them), ready to commit.

Subcommands (each prints what it did):

* ``prepare WORK`` copies every run to continue into the scratch folder WORK (the furthest copy of each);
* ``budgets SECONDS`` prints ``NAME SECONDS`` lines: how the time left is shared by the unfinished runs;
* ``record WORK NAME SECONDS MACHINE`` adds a window's GPU seconds and machine to WORK/NAME/gpu.json;
* ``collect TAR`` unpacks a window's tar into gpu-runs/ (only a run further along replaces one) and
  rewrites the README table;
* ``table`` prints the README table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("METAREG_GPU_RUNS", ROOT / "gpu-runs"))  # the smoke run points it at a scratch folder
SHARED = ROOT.parent / "shared" / "gpu-runs"


@dataclass(frozen=True)
class Run:
    name: str  # folder under gpu-runs/
    command: str  # metareg train / perturb meta-train
    preset: str
    target: int  # meta-iterations (or steps) of the paper's schedule
    test: str  # the meta-test once the target is reached
    note: str


ORDER = [
    Run(
        "omniglot-20w1s",
        "train",
        "omniglot-20w1s",
        60000,
        "--episodes 1000",
        "Meta-Dropout Table 1, MAML, Omniglot 20-way 1-shot (paper 95.23 +- 0.17); ships as builtin:omniglot-20w1s",
    ),
    Run(
        "omniglot-20w1s-metadropout",
        "train",
        "omniglot-20w1s-metadropout",
        60000,
        "--episodes 1000 --mc-samples 30",
        "Meta-Dropout Table 1, MAML + Meta-Dropout (paper 96.63 +- 0.13); ships as builtin:omniglot-20w1s-metadropout",
    ),
]


def step_of(folder: Path) -> int:
    """The step of a run folder's checkpoint (-1 if it has none)."""
    try:
        return int(json.loads((folder / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def furthest(name: str, places: tuple[Path, ...] | None = None) -> Path | None:
    """The copy of run ``name`` furthest along among ``places`` (None if there is none)."""
    places = places or ((RUNS,) if "METAREG_GPU_RUNS" in os.environ else (RUNS, SHARED))
    found = [place / name for place in places if step_of(place / name) >= 0]
    return max(found, key=step_of) if found else None


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for run in ORDER:
        source = furthest(run.name)
        if source is None:
            print(f"{run.name}: new (starts from the preset {run.preset})")
            continue
        shutil.copytree(source, work / run.name, dirs_exist_ok=True)
        print(f"{run.name}: continues from {source} at step {step_of(source)} of {run.target}")


def budgets(seconds: int, work: Path) -> list[tuple[str, int]]:
    """The time left shared equally by the runs not at their target, in the order above."""
    pending = [run for run in ORDER if step_of(work / run.name) < run.target]
    if not pending or seconds <= 0:
        return []
    share = seconds // len(pending)
    return [(run.name, share) for run in pending]


def record(work: Path, name: str, seconds: float, machine: str) -> None:
    path = work / name / "gpu.json"
    info = json.loads(path.read_text()) if path.is_file() else {"gpu_seconds": 0.0, "machines": []}
    info["gpu_seconds"] = round(info["gpu_seconds"] + seconds, 1)
    if machine not in info["machines"]:
        info["machines"].append(machine)
    path.write_text(json.dumps(info, indent=2) + "\n")


def collect(tar: Path, into: Path = RUNS) -> None:
    """Unpack a window's runs into ``into``; a run replaces the committed one only if further along."""
    scratch = into.parent / ".gpu-runs-incoming"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with tarfile.open(tar) as archive:
        archive.extractall(scratch, filter="data")  # no absolute paths, links or devices
    for run in ORDER:
        new = scratch / run.name
        if step_of(new) > step_of(into / run.name):
            shutil.rmtree(into / run.name, ignore_errors=True)
            shutil.copytree(new, into / run.name)
            print(f"{run.name}: now at step {step_of(into / run.name)} of {run.target}")
    shutil.rmtree(scratch, ignore_errors=True)
    (into / "README.md").write_text(readme(into))


def readme(folder: Path = RUNS) -> str:
    lines = [
        "# Runs that accumulate across GPU windows",
        "",
        "Each GPU window (`benchmarks/gpu_run.sh`) continues these runs for the time it has left and",
        "`python benchmarks/gpu_runs.py collect TAR` brings them back here. Runs not finished are",
        "progress, not results: their accuracy is that of a partial schedule.",
        "",
        "| run | paper row | iterations done / target | GPU minutes | machines | test |",
        "|---|---|---|---|---|---|",
    ]
    for run in ORDER:
        folder_run = folder / run.name
        step = max(step_of(folder_run), 0)
        info = json.loads((folder_run / "gpu.json").read_text()) if (folder_run / "gpu.json").is_file() else {}
        test = folder_run / "test.json"
        if test.is_file():
            t = json.loads(test.read_text())
            tested = f"{100 * t['mean']:.2f} +- {100 * t['ci95']:.2f} ({t['episodes']} episodes)"
        else:
            tested = "not yet (tested at the target)"
        minutes = f"{info.get('gpu_seconds', 0) / 60:.1f}"
        machines = ", ".join(info.get("machines", [])) or "none yet"
        lines.append(f"| `{run.name}` | {run.note} | {step} / {run.target} | {minutes} | {machines} | {tested} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, *args = argv
    if command == "prepare":
        prepare(Path(args[0]))
    elif command == "budgets":
        for name, seconds in budgets(int(args[0]), Path(args[1])):
            print(name, seconds)
    elif command == "record":
        record(Path(args[0]), args[1], float(args[2]), args[3])
    elif command == "collect":
        collect(Path(args[0]))
    elif command == "table":
        print(readme(), end="")
    elif command == "info":  # NAME -> "command preset target test"
        run = next(r for r in ORDER if r.name == args[0])
        print(run.command, run.preset, run.target, run.test)
    else:
        print(f"unknown subcommand {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
