#!/usr/bin/env bash
# LLM benchmark (BENCHMARKS.md, "Generation: genai-perf"): genai-perf, the tool LLM users
# benchmark with, driving the streaming model gpt2-small-stream unchanged, as it drives
# a model of Triton's vLLM backend (--backend vllm --endpoint-type kserve --streaming).
# genai-perf goes into a venv of its own (.deps/genai-perf: it pins its own numpy,
# pandas and transformers). BENCH_CONCURRENCY (1,8), BENCH_INTERVAL_MS (4000),
# BENCH_OUTPUT_TOKENS (20).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
source scripts/perf-analyzer-env.sh
GENAI_PERF_VERSION="0.0.16"
GENAI_PERF_VENV="$DEPS/genai-perf"
if ! "$GENAI_PERF_VENV/bin/genai-perf" --version 2>/dev/null | grep -q " $GENAI_PERF_VERSION\$"; then
  echo "[bench-genai-perf] installing genai-perf $GENAI_PERF_VERSION into $GENAI_PERF_VENV" >&2
  python3 -m venv "$GENAI_PERF_VENV"
  "$GENAI_PERF_VENV/bin/pip" install -q --disable-pip-version-check "genai-perf==$GENAI_PERF_VERSION"
fi
export GENAI_PERF="$GENAI_PERF_VENV/bin/genai-perf"
# genai-perf runs perf_analyzer from PATH.
export PATH="$VENV/bin:$PATH"
exec "$PYTHON" tools/bench/genai_perf.py
