#!/usr/bin/env bash
# Megabyte texts (BENCHMARKS.md, "Long texts"): one gRPC request of 16 texts of 1 MiB to
# gpt2-small and sentiment-classifier, words (only their kept end is tokenized) against
# one letter repeated (no word end, tokenized whole), and the worst latency of one-text
# requests meanwhile. BENCH_TEXTS (16), BENCH_ROUNDS (2).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec "$PYTHON" tools/bench/long_texts.py
