"""GPU against CPU, end to end through tritonserver: `sentiment-classifier` and
`gpt2-small` (50 sampled new tokens; the KV cache and token choice stay on the device
through IO binding) as shipped (KIND_CPU) and the same files on GPU 0 (`KIND_GPU`, one
instance), one server, the same run, alternating, perf_analyzer over gRPC at concurrency
1 and 8, the classic payload (one text, shape [1]).

Needs an NVIDIA GPU, the CUDA build of ONNX Runtime (`onnxruntime-gpu==1.31.1`, CUDA 13)
named by ORT_DYLIB_PATH, and the CUDA 13 libraries it loads on LD_LIBRARY_PATH. Without
them it stops before starting anything, saying what is missing.

Run through scripts/bench-gpu.sh. Prints a Markdown table for BENCHMARKS.md.
    BENCH_ROUNDS (3), BENCH_INTERVAL_MS (3000)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from perf import REPO_ROOT, model_copy, perf_analyzer, stability_note, text_only_data, tritonserver

MODELS = {"sentiment-classifier": "This is a great day!", "gpt2-small": "Once upon a time"}
CONCURRENCY = (1, 8)
GPU = "-gpu"


def missing() -> str | None:
    """What this machine lacks for the benchmark, or None."""
    if shutil.which("nvidia-smi") is None or subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "no NVIDIA GPU here (nvidia-smi -L fails or is missing)"
    library = os.environ.get("ORT_DYLIB_PATH", "")
    if not Path(library).is_file():
        return ("ORT_DYLIB_PATH must name the CUDA build of ONNX Runtime "
                "(libonnxruntime.so.1.31.1 from onnxruntime-gpu==1.31.1)")
    if not (Path(library).parent / "libonnxruntime_providers_cuda.so").is_file():
        return f"{Path(library).parent} has no libonnxruntime_providers_cuda.so: not the CUDA build"
    return None


def repository(workdir: Path) -> Path:
    """Each model's latest version on the CPU as shipped, and on GPU 0."""
    root = workdir / "repository"
    for model in MODELS:
        source = REPO_ROOT / "model-repository" / model
        model_copy(source, root, model, version="2")
        model_copy(source, root, model + GPU, version="2",
                   instances="{ count: 1, kind: KIND_GPU, gpus: [ 0 ] }")
    return root


def main() -> int:
    reason = missing()
    if reason:
        sys.exit(f"bench-gpu: {reason}")
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    interval = int(os.environ.get("BENCH_INTERVAL_MS", "3000"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    results: dict[tuple[str, int], list[dict]] = {}
    args = [f"--backend-config=rust,onnxruntime-library={os.environ['ORT_DYLIB_PATH']}"]
    with tritonserver(repository(workdir), workdir, args) as server:
        url = f"127.0.0.1:{server['grpc']}"
        for round_index in range(rounds):
            for model, text in MODELS.items():
                data = text_only_data(workdir, text)
                for concurrency in CONCURRENCY:
                    pair = (model, model + GPU)
                    for name in pair if round_index % 2 == 0 else pair[::-1]:
                        measured = perf_analyzer(name, "grpc", url, concurrency, workdir, data, interval)
                        results.setdefault((name, concurrency), []).append(measured)
                        print(f"[bench-gpu] c={concurrency} {name}: {measured}", file=sys.stderr, flush=True)

    def median(name: str, concurrency: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, concurrency)])

    print("| model | concurrency | CPU infer/s | GPU infer/s | GPU / CPU | CPU p50 / p99 (ms) | "
          "GPU p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for model in MODELS:
        for concurrency in CONCURRENCY:
            cpu, gpu = (median(name, concurrency, "infer_per_s") for name in (model, model + GPU))
            latency = {name: f"{median(name, concurrency, 'p50_ms'):.2f} / {median(name, concurrency, 'p99_ms'):.2f}"
                       for name in (model, model + GPU)}
            print(f"| `{model}` | {concurrency} | {cpu:,.1f} | {gpu:,.1f} | {gpu / cpu:.2f} | "
                  f"{latency[model]} | {latency[model + GPU]} |")
    print(f"\n(median of {rounds} rounds per cell of {interval} ms windows; {stability_note(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
