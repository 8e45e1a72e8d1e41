#!/usr/bin/env bash
# Checks that the backend's modules import each other without cycles: builds the
# module graph with cargo-modules (installed on first use, ~15 min to compile) and
# looks for a cycle among its "uses" edges between modules. Not run in CI (the
# install alone would take most of CI's time); run it after moving code between
# modules.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
CARGO_MODULES_VERSION=0.27.0 # the last release that builds with Rust 1.95
if ! cargo modules --version 2>/dev/null | grep -q "$CARGO_MODULES_VERSION"; then
  cargo install cargo-modules --version "$CARGO_MODULES_VERSION" --locked
fi
# Modules only (no functions, types or traits); "owns" edges stay (cargo-modules drops
# every node they do not reach), only "uses" edges count as imports.
cargo modules dependencies --lib -p triton-rust-backend \
  --no-externs --no-sysroot --no-fns --no-traits --no-types |
  python3 -c '
import re, sys
edges = {}
for source, target in re.findall(r"\"([^\"]+)\" -> \"([^\"]+)\" \[label=\"uses\"", sys.stdin.read()):
    if source != target:
        edges.setdefault(source, set()).add(target)
modules = set(edges) | {t for ts in edges.values() for t in ts}
state = {}  # 1: on the current path, 2: done

def visit(module, path):
    state[module] = 1
    for target in sorted(edges.get(module, ())):
        if state.get(target) == 1:
            cycle = path[path.index(target):] + [target]
            sys.exit("module cycle: " + " -> ".join(cycle))
        if target not in state:
            visit(target, path + [target])
    state[module] = 2

for module in sorted(modules):
    if module not in state:
        visit(module, [module])
print(f"no module cycles: {len(modules)} modules, {sum(map(len, edges.values()))} import edges")
'
