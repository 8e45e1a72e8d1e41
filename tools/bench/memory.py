"""Memory of a real-size encoder per instance count: builds the random-weight
BERT-base-size encoder (tools/bench/real_size.py, 110M parameters, a 415 MiB model.onnx),
serves it with `instance_group { count: N }` for N = 1, 2, 4, and reads tritonserver's
resident memory (VmRSS) after 16 requests.

Run through scripts/bench-memory.sh. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import types
from pathlib import Path

import requests

import real_size
from perf import model_copy, tritonserver

MODEL = "encoder-base"
COUNTS = (1, 2, 4)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    dims = types.SimpleNamespace(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, positions=512)
    built = real_size.write_model(workdir / "built", MODEL, "feature-extraction", dims)
    size = (built / "1" / "model.onnx").stat().st_size / 2**20
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "data": ["How much memory does one more instance cost?"]}]}
    rows = []
    for count in COUNTS:
        repository = workdir / f"count-{count}"
        model_copy(built, repository, MODEL, instances=f"{{ count: {count}, kind: KIND_CPU }}")
        with tritonserver(repository, workdir) as server:
            for _ in range(16):
                response = requests.post(f"http://127.0.0.1:{server['http']}/v2/models/{MODEL}/infer",
                                         json=body, timeout=60)
                response.raise_for_status()
            rows.append((count, rss_mib(server["pid"])))
        shutil.rmtree(repository)
        print(f"[bench-memory] count {count}: {rows[-1][1]:.0f} MiB", file=sys.stderr, flush=True)
    print(f"| instances | tritonserver RSS (MiB) | per instance after the first (MiB) |")
    print("|---:|---:|---:|")
    for count, rss in rows:
        extra = "" if count == 1 else f"{(rss - rows[0][1]) / (count - 1):.0f}"
        print(f"| {count} | {rss:.0f} | {extra} |")
    print(f"\n(model.onnx {size:.0f} MiB; VmRSS after 16 requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
