#!/usr/bin/env bash
# Router overhead (BENCHMARKS.md, "A/B router overhead"): perf_analyzer through
# sentiment-classifier-ab and straight to sentiment-classifier, same server, same run.
# BENCH_ROUNDS (default 3) sets the rounds per cell.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
source scripts/perf-analyzer-env.sh
exec "$PYTHON" tools/bench/router_overhead.py
