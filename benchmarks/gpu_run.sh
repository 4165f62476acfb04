#!/usr/bin/env bash
# One GPU window of metareg, in one command of at most 9 minutes on a fresh H100/H200 machine:
#   1. the CUDA tier (tests/test_cuda.py, `pytest -m cuda`): graphs vs eager, resume with graphs,
#      vmap vs loop, episodes gathered on the GPU, batched Monte-Carlo samples, CUDA vs CPU meta-test;
#   2. `metareg bench --device cuda` (engine, plain loop, vmap and graph rows; the S = 30 meta-test),
#      `metareg bench --memory` (stored vs recomputed steps, the bf16 meta-gradient error)
#      and an operator profile of the engine;
#   3. the paper-scale runs of benchmarks/gpu_runs.py (gpu-runs/ in the repository, or a copy further
#      along in ../shared/gpu-runs/) continued for the time left, each tested once at its target;
#   4. everything kept written to $OUT (at most 8 files): summary.txt, cuda-tier.txt, bench.txt,
#      profile.txt, runs.txt and gpu-runs.tar.gz (the run folders; bring them home with
#      `python benchmarks/gpu_runs.py collect FILES_AT/gpu-runs.tar.gz` and commit gpu-runs/).
#
# The GPU machine has torch (CUDA), numpy, safetensors, pyyaml, tqdm and pillow but no network and
# no pytest: prepare the carried folder first, on this machine: `bash benchmarks/gpu_prepare.sh`
# (Omniglot and a pytest for the tier in data-local/, which git ignores), then run
#   device run --carry data-local --timeout 560 'bash benchmarks/gpu_run.sh'
# `--cpu-smoke` runs the same flow on the CPU with tiny budgets and the glyphs data (the CUDA tier's
# code included, on the CPU), into a scratch copy of the runs: run it before any window.
set -uo pipefail  # no -e: a failing step must not lose what the others measured
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
SKIP_TIER=0
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    --skip-tier) SKIP_TIER=1 ;;
    *) echo "usage: bash benchmarks/gpu_run.sh [--cpu-smoke] [--skip-tier]" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$ROOT/src:$ROOT/data-local/pylib${PYTHONPATH:+:$PYTHONPATH}"
export METAREG_CACHE=${METAREG_CACHE:-$ROOT/data-local/cache}
PY=${PYTHON:-python3}
[ $SMOKE = 1 ] && [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python
OUT=${OUT:-$ROOT/runs/gpu-window}
WORK=$(mktemp -d)
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
: > "$OUT/runs.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }
m() { $PY -m metareg.cli --no-progress "$@"; }

if [ $SMOKE = 1 ]; then
  DEVICE=cpu; LIMIT=${GPU_RUN_SECONDS:-200}; TIER_TIMEOUT=900; BENCH_TIMEOUT=300; MIN_RUNS=40
  BENCH=(--iterations 1 --shape omniglot-20w1s --way 3 --shot 1 --query 2 --channels 4 --mc 2 --skip-check)
  PROFILE=(--iterations 1 --shape omniglot-20w1s --way 3 --shot 1 --query 2 --channels 4 --skip-check --profile)
  TRAIN=(--set data.name=glyphs --set "data.options={num_classes: 40}" --set data.train_split=train
         --set "model.options={channels: 8, init: truncated_normal, norm_scale: false}" --set data.way=5)
  RESUME=()
  export METAREG_GPU_RUNS=$WORK/committed  # never touch the real runs
  export METAREG_CUDA_TIER_ON_CPU=1
else
  DEVICE=cuda; LIMIT=${GPU_RUN_SECONDS:-530}; TIER_TIMEOUT=150; BENCH_TIMEOUT=150; MIN_RUNS=0
  BENCH=(--iterations 20 --mc 30)
  PROFILE=(--iterations 5 --shape omniglot-20w1s --skip-check --profile)
  TRAIN=(--data-root "$ROOT/data-local/omniglot")
  RESUME=(--data-root "$ROOT/data-local/omniglot")  # the data moved: the run keeps everything else
  [ -d "$ROOT/data-local/omniglot" ] || say "warning: no Omniglot at data-local/omniglot (run benchmarks/gpu_prepare.sh and carry data-local)"
fi
left() { echo $(( LIMIT - $(elapsed) )); }
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU smoke run)')" 2>&1)
say "metareg GPU window on: $GPU (torch $($PY -c 'import torch; print(torch.__version__)' 2>&1), $($PY --version 2>&1))"

# 1. The CUDA tier.
if [ $SKIP_TIER = 1 ]; then
  say "== CUDA tier: skipped (--skip-tier) =="
else
  t0=$(date +%s)
  timeout $TIER_TIMEOUT $PY -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_cuda.py > "$OUT/cuda-tier.txt" 2>&1
  say "== CUDA tier ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/cuda-tier.txt") =="
fi

# 2. The bench and a profile of the engine.
t0=$(date +%s)
timeout $BENCH_TIMEOUT $PY -m metareg.cli --no-progress bench --device $DEVICE "${BENCH[@]}" > "$OUT/bench.txt" 2>&1
say "== bench ($(( $(date +%s) - t0 )) s, exit $?) =="
cat "$OUT/bench.txt" >> "$SUMMARY"
if [ "$(left)" -gt 240 ]; then
  timeout 60 $PY -m metareg.cli --no-progress bench --device $DEVICE "${PROFILE[@]}" > "$OUT/profile.txt" 2>&1
fi
# 2b. Memory and bf16 (issue 24): the engine stored/recomputed against the plain loop, and the bf16
# meta-gradient's error against float32 (which decides whether train.precision=bf16 may be a default).
if [ "$(left)" -gt 240 ]; then
  t0=$(date +%s)
  MEMORY=(--shape omniglot-20w1s --memory-steps 5)
  [ $SMOKE = 1 ] && MEMORY=(--shape omniglot-20w1s --memory-steps 2 --iterations 1)
  timeout 90 $PY -m metareg.cli --no-progress bench --memory --device $DEVICE "${MEMORY[@]}" >> "$OUT/bench.txt" 2>&1
  say "== bench --memory ($(( $(date +%s) - t0 )) s, exit $?) =="
fi

# 3. The runs that accumulate across windows, for the time left (60 s kept to test and pack).
$PY benchmarks/gpu_runs.py prepare "$WORK/runs" 2>&1 | tee -a "$OUT/runs.txt"
while read -r NAME SECONDS_FOR_RUN; do
  [ -n "$NAME" ] || continue
  read -r COMMAND PRESET TARGET TEST <<< "$($PY benchmarks/gpu_runs.py info "$NAME")"
  folder=$WORK/runs/$NAME
  t0=$(date +%s)
  if [ -f "$folder/checkpoint.json" ]; then
    m train --out "$folder" --resume "${RESUME[@]}" --device $DEVICE --time-budget "$SECONDS_FOR_RUN" --no-test >> "$OUT/runs.txt" 2>&1
  else
    steps=()
    [ $SMOKE = 1 ] && steps=(--steps 6 --set train.checkpoint_every=3 --set train.log_every=1)
    m train --preset "$PRESET" "${TRAIN[@]}" "${steps[@]}" --device $DEVICE --out "$folder" --time-budget "$SECONDS_FOR_RUN" --no-test >> "$OUT/runs.txt" 2>&1
  fi
  $PY benchmarks/gpu_runs.py record "$WORK/runs" "$NAME" $(( $(date +%s) - t0 )) "$GPU" >> "$OUT/runs.txt" 2>&1
  step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$folder/checkpoint.json" 2>/dev/null || echo 0)
  [ $SMOKE = 1 ] && TARGET=6
  if [ "$step" -ge "$TARGET" ] && [ ! -f "$folder/test.json" ] && [ "$(left)" -gt 45 ]; then
    # shellcheck disable=SC2086  # TEST holds several flags
    m test --checkpoint "$folder" --device $DEVICE $TEST >> "$OUT/runs.txt" 2>&1
  fi
  say "$NAME: step $step of $TARGET after $(( $(date +%s) - t0 )) s of this window"
done <<< "$($PY benchmarks/gpu_runs.py budgets $(( $(left) - 60 > MIN_RUNS ? $(left) - 60 : MIN_RUNS )) "$WORK/runs")"

# 4. Pack the runs (the logs above are already in $OUT).
tar czf "$OUT/gpu-runs.tar.gz" -C "$WORK/runs" . 2>> "$OUT/runs.txt"
say "== packed $(du -h "$OUT/gpu-runs.tar.gz" | cut -f1) of run folders; the window took $(elapsed) s =="
$PY - "$WORK/runs" <<'PY' | tee -a "$SUMMARY"
import csv, json, sys
from pathlib import Path
for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "log.csv").is_file()):
    rows = list(csv.DictReader((folder / "log.csv").open()))
    rate = float(rows[-1]["tasks_per_s"]) / 4 if rows and rows[-1].get("tasks_per_s") else float("nan")
    step = json.loads((folder / "checkpoint.json").read_text())["step"]
    print(f"{folder.name}: step {step}, {rate:.1f} meta-iterations/s at the end (meta-batch 4)")
PY
rm -rf "$WORK"
