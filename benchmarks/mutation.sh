#!/usr/bin/env bash
# Mutation testing of the math, a development habit (not run in CI: hours on 2 cores).
#
# mutmut 3, configured in pyproject.toml [tool.mutmut], mutates perturb/, inner/, evaluate/,
# meta/bilevel.py, meta/joint.py and noise.py, and runs against every mutant the fast unit tests
# (-m "not slow") that cover the mutated function. Arguments are mutant-name globs, to run a part:
#     bash benchmarks/mutation.sh                                   # everything
#     bash benchmarks/mutation.sh 'metareg.noise*' 'metareg.evaluate.calibration*'
# Results accumulate in mutants/ (run again to continue; delete it to start over). At the end it
# prints killed / total per module; `.venv/bin/mutmut results` lists the survivors and
# `.venv/bin/mutmut show NAME` shows one. JOBS=N runs N mutants at a time (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
unset PYTHONPATH # mutmut puts mutants/src first; a src/ on the path would test the unmutated code
"$PYTHON" -m mutmut run --max-children "${JOBS:-1}" "$@" || echo "mutmut stopped with status $?"
"$PYTHON" - "$@" <<'PY'
"""killed / total per module, from mutmut's records (mutants/src/**/*.py.meta)."""
import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

patterns = sys.argv[1:] or ["*"]
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout",
          -24: "timeout", 152: "timeout", 255: "timeout", None: "not run"}
rows = []
for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
    module = meta.relative_to("mutants/src").as_posix().removesuffix(".py.meta").replace("/", ".")
    codes = [c for k, c in json.loads(meta.read_text())["exit_code_by_key"].items()
             if any(fnmatch.fnmatch(k, p) for p in patterns)]
    if codes:
        rows.append((module, Counter(STATUS.get(c, "other") for c in codes), len(codes)))
columns = ["killed", "timeout", "survived", "no tests", "not run", "other"]
print(f"{'module':<36}" + "".join(f"{c:>10}" for c in columns) + f"{'total':>7}  killed / tried")
for module, count, total in rows:
    tried = count["killed"] + count["timeout"] + count["survived"]
    score = f"{100 * (count['killed'] + count['timeout']) / tried:.1f} %" if tried else "-"
    print(f"{module:<36}" + "".join(f"{count[c]:>10}" for c in columns) + f"{total:>7}  {score}")
PY
