#!/usr/bin/env bash
# Memory per instance count (BENCHMARKS.md, "Memory per instance"): a random-weight
# BERT-base-size encoder served with 1, 2 and 4 instances, tritonserver's RSS for each.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec "$PYTHON" tools/bench/memory.py
