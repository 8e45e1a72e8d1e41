#!/usr/bin/env bash
# Batching across executions (BENCHMARKS.md, "Encoders: batching across executions"):
# perf_analyzer on a real-size random-weight classifier: as shipped, on one instance, and
# one request per execution, same server, same run. BENCH_ROUNDS (3), BENCH_INTERVAL_MS
# (5000).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
source scripts/perf-analyzer-env.sh
exec "$PYTHON" tools/bench/encoder_batching.py
