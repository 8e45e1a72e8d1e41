#!/usr/bin/env bash
# Router overhead (BENCHMARKS.md, "A/B router overhead"): perf_analyzer through
# sentiment-classifier-ab and straight to sentiment-classifier, same server, same run.
# BENCH_ROUNDS (default 3) sets the rounds per cell.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
# perf_analyzer (from the tritonclient wheel) links libcudart and libb64 even without a GPU.
if ! "$PYTHON" -c 'import nvidia.cuda_runtime' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check "nvidia-cuda-runtime-cu12==12.*"
fi
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi
cuda_lib="$("$PYTHON" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')"
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PERF_ANALYZER="$VENV/bin/perf_analyzer"
exec "$PYTHON" tools/bench/router_overhead.py
