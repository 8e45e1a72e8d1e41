#!/usr/bin/env bash
# In-flight batching benchmark (BENCHMARKS.md, "Generation: in-flight batching"):
# perf_analyzer over gRPC streaming on gpt2-small-stream as shipped and on a copy that
# runs one sequence at a time, same server, same run. BENCH_ROUNDS (3),
# BENCH_INTERVAL_MS (4000).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
source scripts/perf-analyzer-env.sh
exec "$PYTHON" tools/bench/inflight.py
