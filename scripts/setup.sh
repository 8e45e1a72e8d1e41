#!/usr/bin/env bash
# Installs everything the server and the tests need, then builds the backend.
# Idempotent: a second run only rebuilds what changed.
#   - Debian packages: libclang-dev (bindgen), python3-venv, nginx with njs (the HTTP
#     gateway of docker/k8s/gateway/, which tests/test_gateway.py runs)
#   - .deps/venv: Python test clients (tritonclient, pytest, numpy)
#   - .deps/pytriton: tritonserver 2.51 from the PyPI wheel nvidia-pytriton==0.7.0
#   - .deps/onnxruntime: libonnxruntime.so.1.31.1 from the PyPI wheel onnxruntime==1.31.1
#   - .deps/backends/rust: libtriton_rust.so (release build) + libonnxruntime beside it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (1.89 or newer), e.g. with rustup" >&2
  exit 1
fi

missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
dpkg -s nginx >/dev/null 2>&1 || missing+=(nginx)
dpkg -s libnginx-mod-http-js >/dev/null 2>&1 || missing+=(libnginx-mod-http-js)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing system packages: ${missing[*]} (install them with your package manager)" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$DEPS"
if [ ! -x "$PYTHON" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
# Reinstall whenever tests/requirements.txt changes.
requirements_stamp="$VENV/.requirements.sha256"
if ! sha256sum --status -c "$requirements_stamp" 2>/dev/null; then
  say "installing Python test clients"
  "$PYTHON" -m pip install -q --disable-pip-version-check -r "$REPO_ROOT/tests/requirements.txt"
  sha256sum "$REPO_ROOT/tests/requirements.txt" >"$requirements_stamp"
fi

# Unpacks one file-bearing wheel into a directory (a wheel is a zip file).
fetch_wheel() {
  local spec="$1" dest="$2" marker="$3"
  [ -e "$dest/$marker" ] && return 0
  say "downloading $spec"
  local tmp
  tmp="$(mktemp -d)"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" "$spec"
  rm -rf "$dest"
  mkdir -p "$dest"
  "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$tmp"/*.whl "$dest"
  rm -rf "$tmp"
  [ -e "$dest/$marker" ] || { echo "$spec did not contain $marker" >&2; exit 1; }
}
fetch_wheel "nvidia-pytriton==$PYTRITON_VERSION" "$DEPS/pytriton" "pytriton/tritonserver/bin/tritonserver"
chmod +x "$TRITONSERVER"
fetch_wheel "onnxruntime==$ONNXRUNTIME_VERSION" "$DEPS/onnxruntime" "onnxruntime/capi/libonnxruntime.so.$ONNXRUNTIME_VERSION"

say "building libtriton_rust.so (release)"
cargo build --release --locked -p triton-rust-backend --lib
mkdir -p "$BACKEND_DIR/rust"
# `install` replaces a changed file by a new one instead of writing into it, so a
# server that has the old library loaded keeps running.
for file in target/release/libtriton_rust.so "$ORT_LIBRARY" "$ORT_DIR/libonnxruntime_providers_shared.so"; do
  cmp -s "$file" "$BACKEND_DIR/rust/$(basename "$file")" || install -m 0755 "$file" "$BACKEND_DIR/rust/"
done
say "ready: $TRITONSERVER with backend $BACKEND_LIBRARY"
