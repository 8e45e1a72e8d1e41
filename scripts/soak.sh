#!/usr/bin/env bash
# Soak test (not in CI): MINUTES of mixed good and bad HTTP/gRPC traffic, streaming
# clients that disconnect and a model reloaded every 5 s, against a tritonserver it
# starts itself; fails on a lost request, a wrong answer, a crash or RSS growth over
# 5 %. Usage: scripts/soak.sh MINUTES [options of tools/soak/soak.py]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec "$PYTHON" tools/soak/soak.py "$@"
