#!/usr/bin/env bash
# Prepare data-local/ (ignored by git) to be carried to a GPU machine for benchmarks/gpu_run.sh:
# the Omniglot archives and split files from ../shared/data/omniglot, and a pytest (pure Python,
# works on the GPU machine's Python 3.12) for the CUDA tier. About 17 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${METAREG_SHARED_DATA:-../shared/data}
mkdir -p data-local
if [ ! -d data-local/omniglot ]; then
  cp -r "$SHARED/omniglot" data-local/omniglot
fi
if [ ! -d data-local/pylib/pytest ]; then
  PIP=${PIP:-.venv/bin/pip}
  $PIP install --quiet --no-deps --target data-local/pylib pytest pluggy iniconfig packaging
fi
du -sh data-local
