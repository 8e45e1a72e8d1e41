#!/usr/bin/env bash
# Generation throughput, KV cache vs no cache, batch 1 and 8 (see BENCHMARKS.md).
# Settings come from the environment: BENCH_MODEL_DIR, BENCH_CONTEXT, BENCH_NEW_TOKENS,
# BENCH_ROUNDS, BENCH_THREADS, BENCH_DEVICE (documented in backend/src/bin/bench-generation.rs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ORT_LIBRARY}" \
  cargo run --locked --release -p triton-rust-backend --bin bench-generation
