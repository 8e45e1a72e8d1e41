"""Serving benchmark: `sentiment-classifier` on this backend against its Python-backend
peer (tools/bench/python_peer: Triton's Python backend + onnxruntime + tokenizers on the
same ONNX file and tokenizer, all requests of an execute call in one padded batch, the
same threads), one server, the same run, alternating, HTTP and gRPC, concurrency 1, 8
and 32, measured by perf_analyzer with the classic payload (one text, shape [1]). Also
the server-side compute per request (Triton's statistics) against ONNX Runtime called
in-process on the same input (tokenize + run, one thread): the backend's overhead.

Run through scripts/bench-serving.sh (it sets up perf_analyzer and the peer's packages):
    scripts/bench-serving.sh                 # 3 rounds
    BENCH_ROUNDS=1 BENCH_CONCURRENCY=1 BENCH_INTERVAL_MS=1000 scripts/bench-serving.sh  # CI smoke
Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from perf import REPO_ROOT, perf_analyzer, stability_note, tritonserver

OURS, PEER = "sentiment-classifier", "sentiment-classifier-python"
VERSION = "2"
TEXT = "This is a great day!"
PEER_DIR = Path(__file__).resolve().parent / "python_peer" / PEER
PYTHON_BACKEND = REPO_ROOT / ".deps" / "pytriton" / "pytriton" / "tritonserver"


def site_packages() -> list[str]:
    """Where the peer (and the in-process measurement) find onnxruntime and tokenizers."""
    return [str(REPO_ROOT / ".deps" / "onnxruntime"), str(REPO_ROOT / ".deps" / "python-peer")]


def repository(workdir: Path) -> Path:
    """The shipped classifier, and its peer on the files of the same version."""
    root = workdir / "repository"
    shutil.copytree(REPO_ROOT / "model-repository" / OURS, root / OURS)
    peer = root / PEER
    shutil.copytree(PEER_DIR, peer)
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copyfile(REPO_ROOT / "model-repository" / OURS / VERSION / name, peer / "1" / name)
    shutil.copytree(REPO_ROOT / "model-repository" / OURS / "warmup", peer / "warmup")
    config = (REPO_ROOT / "model-repository" / OURS / "config.pbtxt").read_text()
    for old, new in [(f'name: "{OURS}"', f'name: "{PEER}"'), ('backend: "rust"', 'backend: "python"'),
                     ("version_policy: { all { } }\n", "")]:
        assert old in config, f"the shipped config changed: {old!r}"
        config = config.replace(old, new)
    config += ('parameters: { key: "site_packages", value: { string_value: "'
               + ":".join(site_packages()) + '" } }\n')
    (peer / "config.pbtxt").write_text(config)
    return root


def backends(workdir: Path) -> Path:
    """Ours and Triton's Python backend; its stub is reached through a link, as it finds
    its libraries beside its real path."""
    root = workdir / "backends"
    (root / "python").mkdir(parents=True)
    (root / "rust").symlink_to(Path(os.environ["TRITON_RUST_BACKEND_DIR"]) / "rust")
    for item in (PYTHON_BACKEND / "backends" / "python").iterdir():
        shutil.copy(item, root / "python" / item.name)
    (root / "python" / "triton_python_backend_stub").symlink_to(
        PYTHON_BACKEND / "python_backend_stubs" / "3.11" / "triton_python_backend_stub")
    return root


def compute_us(base: str, model: str, version: str) -> tuple[float, int]:
    stats = requests.get(f"{base}/v2/models/{model}/versions/{version}/stats", timeout=10).json()
    inference = stats["model_stats"][0]["inference_stats"]["compute_infer"]
    return inference["ns"] / 1000, inference["count"]


def in_process_us(repetitions: int = 2000) -> float:
    """Tokenize + run for the same text, ONNX Runtime in this process, one thread."""
    sys.path[:0] = site_packages()
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    version_dir = REPO_ROOT / "model-repository" / OURS / VERSION
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    names = {i.name for i in session.get_inputs()}

    def once():
        ids = np.array([tokenizer.encode(TEXT).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        session.run(["logits"], feeds)

    for _ in range(100):
        once()
    started = time.perf_counter()
    for _ in range(repetitions):
        once()
    return (time.perf_counter() - started) / repetitions * 1e6


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    concurrencies = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,8,32").split(",")]
    interval = int(os.environ.get("BENCH_INTERVAL_MS", "3000"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    data = ["--string-data", TEXT, "--shape", "text_input:1"]
    results: dict[tuple[str, int, str], list[dict]] = {}
    versions = {OURS: VERSION, PEER: "1"}
    with tritonserver(repository(workdir), workdir, backend_dir=backends(workdir)) as server:
        base = f"http://127.0.0.1:{server['http']}"
        for protocol in ("http", "grpc"):
            url = f"127.0.0.1:{server[protocol]}"
            for concurrency in concurrencies:
                for round_index in range(rounds):
                    # Alternate which goes first, so drift in the machine favours neither.
                    order = (OURS, PEER) if round_index % 2 == 0 else (PEER, OURS)
                    for model in order:
                        before = compute_us(base, model, versions[model])
                        measured = perf_analyzer(model, protocol, url, concurrency, workdir, data, interval)
                        after = compute_us(base, model, versions[model])
                        measured["compute_us"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                        results.setdefault((protocol, concurrency, model), []).append(measured)
                        print(f"[bench-serving] {protocol} c={concurrency} {model}: {measured}",
                              file=sys.stderr, flush=True)
    in_process = in_process_us()

    def median(protocol: str, concurrency: int, model: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(protocol, concurrency, model)])

    print("| protocol | concurrency | Python peer infer/s | ours infer/s | ours / peer | "
          "peer p50 / p99 (ms) | ours p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for protocol in ("http", "grpc"):
        for concurrency in concurrencies:
            peer, ours = (median(protocol, concurrency, m, "infer_per_s") for m in (PEER, OURS))
            latency = {m: (median(protocol, concurrency, m, "p50_ms"), median(protocol, concurrency, m, "p99_ms"))
                       for m in (PEER, OURS)}
            print(f"| {'HTTP' if protocol == 'http' else 'gRPC'} | {concurrency} | {peer:,.0f} | "
                  f"{ours:,.0f} | {ours / peer:.2f} | {latency[PEER][0]:.2f} / {latency[PEER][1]:.2f} | "
                  f"{latency[OURS][0]:.2f} / {latency[OURS][1]:.2f} |")
    compute = {m: statistics.median(r["compute_us"] for key, runs in results.items() if key[2] == m for r in runs)
               for m in (OURS, PEER)}
    print("\n| server-side compute per request (µs) | Python peer | ours | ONNX Runtime in-process | "
          "ours / in-process |")
    print("|---|---:|---:|---:|---:|")
    print(f"| median over all runs | {compute[PEER]:.0f} | {compute[OURS]:.0f} | {in_process:.0f} | "
          f"{compute[OURS] / in_process:.2f} |")
    print(f"\n(median of {rounds} rounds per cell of {interval} ms windows; {stability_note(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
