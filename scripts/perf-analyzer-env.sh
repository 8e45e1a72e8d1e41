# Sourced by the serving benchmarks: perf_analyzer (from the tritonclient wheel) links
# libcudart and libb64 even without a GPU; installs both once and exports PERF_ANALYZER.
# A benchmark that needs more Debian packages names them in EXTRA_APT_PACKAGES, so one
# apt-get run installs them all.
if ! "$PYTHON" -c 'import nvidia.cuda_runtime' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check "nvidia-cuda-runtime-cu12==12.*"
fi
missing=()
for package in libb64-0d ${EXTRA_APT_PACKAGES:-}; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cuda_lib="$("$PYTHON" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')"
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PERF_ANALYZER="$VENV/bin/perf_analyzer"
