#!/usr/bin/env bash
# The real-model export end to end, offline (docs/real-models.md, "Trying the export
# offline"): tiny Hugging Face sources of the test models exported with optimum, laid out,
# served by tritonserver and compared with tests/reference/ (tests/test_export_optimum.py).
# Installs tools/export/requirements.txt (torch, transformers, optimum: about 3.4 GB, a
# few minutes) into EXPORT_VENV (default /tmp/export-venv, outside the repository).
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
bash scripts/setup.sh
EXPORT_VENV="${EXPORT_VENV:-/tmp/export-venv}"
if [[ ! -x "$EXPORT_VENV/bin/python" ]]; then
  python3 -m venv "$EXPORT_VENV"
fi
echo "[check-export] installing tools/export/requirements.txt into $EXPORT_VENV" >&2
"$EXPORT_VENV/bin/pip" install -q --disable-pip-version-check -r tools/export/requirements.txt
TRITON_RUST_EXPORT_PYTHON="$EXPORT_VENV/bin/python" \
  "$PYTHON" -m pytest tests/test_export_optimum.py -v -p no:cacheprovider "$@"
