#!/usr/bin/env bash
# GPU against CPU, end to end (BENCHMARKS.md, "GPU"): perf_analyzer on sentiment-classifier
# and gpt2-small as shipped and on GPU 0, same server, same run. Needs an NVIDIA GPU,
# ORT_DYLIB_PATH naming the CUDA build of ONNX Runtime (onnxruntime-gpu==1.31.1) and its
# CUDA 13 libraries on LD_LIBRARY_PATH. BENCH_ROUNDS (3), BENCH_INTERVAL_MS (3000).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
source scripts/perf-analyzer-env.sh
exec "$PYTHON" tools/bench/gpu.py
