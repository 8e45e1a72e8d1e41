"""The shared library itself: what it exports to tritonserver."""

import os
import subprocess
from pathlib import Path

# The entry points Triton looks up in a backend; the optional ones included.
ENTRY_POINTS = {
    "TRITONBACKEND_Initialize",
    "TRITONBACKEND_Finalize",
    "TRITONBACKEND_ModelInitialize",
    "TRITONBACKEND_ModelFinalize",
    "TRITONBACKEND_ModelInstanceInitialize",
    "TRITONBACKEND_ModelInstanceFinalize",
    "TRITONBACKEND_ModelInstanceExecute",
    "TRITONBACKEND_GetBackendAttribute",
    "TRITONBACKEND_ModelInstanceReady",
}
# TRITONBACKEND_ModelInstanceReady is optional for Triton (newer releases call it; 2.51
# does not) but this backend defines it, answering from the instance's health.
REQUIRED = ENTRY_POINTS - {"TRITONBACKEND_GetBackendAttribute"}


def dynamic_symbols(library: Path, *flags: str) -> set[str]:
    out = subprocess.run(
        ["nm", "-D", *flags, str(library)], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_exports_only_backend_entry_points():
    library = Path(os.environ["TRITON_RUST_BACKEND_DIR"]) / "rust" / "libtriton_rust.so"
    exported = dynamic_symbols(library, "--defined-only")
    assert REQUIRED <= exported, f"missing entry points: {REQUIRED - exported}"
    assert exported <= ENTRY_POINTS, f"unexpected exports: {sorted(exported - ENTRY_POINTS)[:20]}"


def test_links_neither_tritonserver_nor_onnxruntime():
    """Triton symbols resolve inside the server; ONNX Runtime is loaded at run time."""
    library = Path(os.environ["TRITON_RUST_BACKEND_DIR"]) / "rust" / "libtriton_rust.so"
    needed = subprocess.run(
        ["readelf", "-d", str(library)], check=True, capture_output=True, text=True
    ).stdout
    assert "tritonserver" not in needed
    assert "onnxruntime" not in needed
    assert "TRITONBACKEND_RequestInput" in dynamic_symbols(library, "--undefined-only")
