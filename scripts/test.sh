#!/usr/bin/env bash
# Runs every test: the Rust unit tests, then the integration suite against a real
# tritonserver loading the release libtriton_rust.so. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
cargo test --locked --workspace
"$PYTHON" -m pytest tests -v -p no:cacheprovider "$@"
