# Sourced by the serving benchmarks: perf_analyzer (from the tritonclient wheel) links
# libcudart and libb64 even without a GPU; installs both once and exports PERF_ANALYZER.
if ! "$PYTHON" -c 'import nvidia.cuda_runtime' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check "nvidia-cuda-runtime-cu12==12.*"
fi
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi
cuda_lib="$("$PYTHON" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')"
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PERF_ANALYZER="$VENV/bin/perf_analyzer"
