#!/usr/bin/env bash
# One-run GPU check of metareg (under 8 minutes on one H100/H200): the speed bench, omniglot-20w1s
# trained in a time-budgeted chunk and resumed once, its 1000-episode meta-test, and Meta-Dropout's
# S = 30 meta-test; prints a summary with the GPU's name.
#
# The GPU machine has torch (CUDA) and metareg's dependencies but no network and only the working
# tree: Omniglot must travel in an ignored folder (copy ../shared/data/omniglot to data-local/omniglot,
# listed in .git/info/exclude, and carry it). Usage, from the repository root:
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke     # the same flow on the CPU, tiny budgets (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
DATA=${METAREG_DATA_ROOT:-$PWD/data-local}
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
mkdir -p "$OUT"
LOG="$OUT/summary.txt"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
m() { $PY -m metareg.cli --no-progress "$@"; }

if [ $SMOKE = 1 ]; then
  DEVICE=cpu; BENCH=(--iterations 1 --shape omniglot-20w1s --way 5 --channels 8 --mc 2); B1=20; B2=10; EPISODES=20; MD_EPISODES=4
  TRAIN=(--set data.name=glyphs --set "data.options={}" --set data.train_split=train --set "model.options={channels: 8, init: truncated_normal, norm_scale: false}" --set data.way=5)
else
  DEVICE=cuda; BENCH=(--iterations 20 --mc 30); B1=150; B2=60; EPISODES=1000; MD_EPISODES=100
  TRAIN=(--data-root "$DATA/omniglot")
  [ -d "$DATA/omniglot" ] || { echo "no Omniglot at $DATA/omniglot: copy ../shared/data/omniglot there and carry it" >&2; exit 2; }
fi
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU smoke run)')")
say "metareg GPU check on: $GPU (torch $($PY -c 'import torch; print(torch.__version__)'))"

say "== bench =="
m bench --device $DEVICE "${BENCH[@]}" 2>&1 | tee -a "$LOG"

say "== omniglot-20w1s: a ${B1} s chunk, then resumed for ${B2} s =="
rm -rf "$OUT/omni"
t0=$(date +%s)
m train --preset omniglot-20w1s "${TRAIN[@]}" --device $DEVICE --out "$OUT/omni" --time-budget $B1 --no-test 2>&1 | tail -1 | tee -a "$LOG"
m train --out "$OUT/omni" --resume --device $DEVICE --time-budget $B2 --no-test 2>&1 | tail -1 | tee -a "$LOG"
say "chunks took $(( $(date +%s) - t0 )) s in all"
t0=$(date +%s)
m test --checkpoint "$OUT/omni" --device $DEVICE --episodes $EPISODES 2>&1 | grep "accuracy" | tee -a "$LOG"
say "meta-test of $EPISODES episodes: $(( $(date +%s) - t0 )) s"

say "== omniglot-20w1s-metadropout: a ${B2} s chunk, then the S = 30 meta-test on $MD_EPISODES episodes =="
rm -rf "$OUT/omni-md"
m train --preset omniglot-20w1s-metadropout "${TRAIN[@]}" --device $DEVICE --out "$OUT/omni-md" --time-budget $B2 --no-test 2>&1 | tail -1 | tee -a "$LOG"
t0=$(date +%s)
m test --checkpoint "$OUT/omni-md" --device $DEVICE --episodes $MD_EPISODES 2>&1 | grep "accuracy" | tee -a "$LOG"
say "Meta-Dropout S = 30 meta-test of $MD_EPISODES episodes: $(( $(date +%s) - t0 )) s"

say "== summary =="
$PY - "$OUT" "$GPU" <<'PY' | tee -a "$LOG"
import csv, json, sys
from pathlib import Path
out, gpu = Path(sys.argv[1]), sys.argv[2]
print(f"GPU: {gpu}")
for run in ("omni", "omni-md"):
    rows = list(csv.DictReader((out / run / "log.csv").open()))
    step = json.loads((out / run / "checkpoint.json").read_text())["step"]
    rate = float(rows[-1]["tasks_per_s"]) / 4 if rows else float("nan")
    print(f"{run}: {step} meta-iterations, {rate:.1f} it/s at the end of the last chunk (meta-batch 4)")
PY
