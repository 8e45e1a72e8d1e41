# Shared paths for the setup, serve and test scripts (sourced, not run).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${TRITON_RUST_DEPS:-$REPO_ROOT/.deps}"
VENV="$DEPS/venv"
PYTHON="$VENV/bin/python"
TRITONSERVER="$DEPS/pytriton/pytriton/tritonserver/bin/tritonserver"
ORT_DIR="$DEPS/onnxruntime/onnxruntime/capi"
ORT_LIBRARY="$ORT_DIR/libonnxruntime.so.1.31.1"
# Laid out as Triton expects: <backend-directory>/rust/libtriton_rust.so, with
# libonnxruntime.so.* beside it.
BACKEND_DIR="$DEPS/backends"
BACKEND_LIBRARY="$BACKEND_DIR/rust/libtriton_rust.so"
PYTRITON_VERSION="0.7.0"
ONNXRUNTIME_VERSION="1.31.1"
# ONNX Runtime 1.31 otherwise writes a device id and a database under ~/.cache.
export ORT_DISABLE_TELEMETRY=1
export TRITON_RUST_BACKEND_DIR="$BACKEND_DIR"
export TRITONSERVER_BIN="$TRITONSERVER"
export TRITON_RUST_ORT_LIBRARY="$ORT_LIBRARY"
