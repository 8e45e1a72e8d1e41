#!/usr/bin/env bash
# Length-aware batching (BENCHMARKS.md, "Length-aware batching"): perf_analyzer on a
# mixed-length load against the classifier grouping rows by length and a copy padding
# every request to its longest text, same server, same run, with the tokens each fed
# to ONNX Runtime. BENCH_ROUNDS (default 3) sets the rounds per cell.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
source scripts/perf-analyzer-env.sh
exec "$PYTHON" tools/bench/padding.py
