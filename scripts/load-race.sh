#!/usr/bin/env bash
# Load/unload race (not in CI): MINUTES of a model loaded and unloaded in a loop while
# 8 client threads send it requests, under core dumps; a crash is counted, backtraced
# and the server restarted. Usage: scripts/load-race.sh MINUTES --backend rust|python
# (python: Triton's own Python backend with an identity model, as the control; needs
# Debian's python3-numpy for the backend's stub).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec "$PYTHON" tools/soak/load_race.py "$@"
