#!/usr/bin/env bash
# A burst behind a long execution (BENCHMARKS.md, "Encoders: a burst behind a long
# execution"): the shipped classifier, the same on one instance, and one instance without
# Triton's priority queue. BENCH_BURSTS (10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec "$PYTHON" tools/bench/burst.py
