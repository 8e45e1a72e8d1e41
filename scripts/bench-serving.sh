#!/usr/bin/env bash
# Serving benchmark (BENCHMARKS.md, "Serving: against a Python-backend peer"):
# perf_analyzer on sentiment-classifier and its Python-backend peer, same server, same
# run. BENCH_ROUNDS (3), BENCH_CONCURRENCY (1,8,32), BENCH_INTERVAL_MS (3000).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
# The peer runs in Triton's Python backend stub, which embeds Debian's libpython3.11 and
# its numpy; onnxruntime comes from .deps/onnxruntime (the wheel setup.sh unpacks) and
# tokenizers from .deps/python-peer.
EXTRA_APT_PACKAGES="libpython3.11 python3-numpy" source scripts/perf-analyzer-env.sh
if [ ! -d "$DEPS/python-peer/tokenizers" ]; then
  "$PYTHON" -m pip install -q --disable-pip-version-check --target "$DEPS/python-peer" "tokenizers==0.22.2"
fi
exec "$PYTHON" tools/bench/serving.py
