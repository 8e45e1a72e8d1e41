"""Router overhead: requests/s and latency through `sentiment-classifier-ab` (the A/B
router, 50/50 over versions 1 and 2) against `sentiment-classifier` directly, same server,
same run, measured by perf_analyzer (the meter Triton users know), alternating the two.

Run through scripts/bench-router.sh (it sets up perf_analyzer's runtime):
    scripts/bench-router.sh                 # 3 rounds, concurrency 1 and 8, HTTP and gRPC
    BENCH_ROUNDS=1 scripts/bench-router.sh  # a quick run
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soak"))
from soak import REPO_ROOT, free_port, stop_server, wait_ready  # noqa: E402

DIRECT, ROUTER = "sentiment-classifier", "sentiment-classifier-ab"
TEXT = "This is a great day!"


def perf_analyzer(model: str, protocol: str, url: str, concurrency: int, workdir: Path) -> dict:
    """One perf_analyzer measurement: infer/s, p50 and p99 latency (ms)."""
    report = workdir / f"{model}-{protocol}-{concurrency}-{time.monotonic_ns()}.csv"
    command = [
        os.environ["PERF_ANALYZER"], "-m", model, "-i", protocol, "-u", url,
        "--concurrency-range", str(concurrency), "--measurement-interval", "3000",
        # A shared 2-core machine is noisy: accept 25 % between windows, try longer.
        "--stability-percentage", "25", "--max-trials", "20",
        "--string-data", TEXT, "--shape", "text_input:1", "-f", str(report),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        sys.exit(f"perf_analyzer failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(report, newline="") as file:
        (row,) = list(csv.DictReader(file))
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    workdir = Path(tempfile.mkdtemp(prefix="bench-router-"))
    log = open(workdir / "tritonserver.log", "wb")
    server = subprocess.Popen([
        os.environ["TRITONSERVER_BIN"], f"--model-repository={REPO_ROOT / 'model-repository'}",
        f"--backend-directory={os.environ['TRITON_RUST_BACKEND_DIR']}",
        "--model-control-mode=explicit", f"--load-model={DIRECT}", f"--load-model={ROUTER}",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
        f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}",
        f"--metrics-port={ports['metrics']}",
    ], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, ORT_DISABLE_TELEMETRY="1"))
    results: dict[tuple[str, int, str], list[dict]] = {}
    try:
        if not wait_ready(f"http://127.0.0.1:{ports['http']}", server):
            sys.exit(f"tritonserver did not start; see {workdir / 'tritonserver.log'}")
        # The router checks its arms at its first request.
        body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
        requests.post(f"http://127.0.0.1:{ports['http']}/v2/models/{ROUTER}/infer", json=body, timeout=60)
        for protocol in ("http", "grpc"):
            url = f"127.0.0.1:{ports[protocol]}"
            for concurrency in (1, 8):
                for round_index in range(rounds):
                    # Alternate which goes first, so drift in the machine favours neither.
                    order = (DIRECT, ROUTER) if round_index % 2 == 0 else (ROUTER, DIRECT)
                    for model in order:
                        measured = perf_analyzer(model, protocol, url, concurrency, workdir)
                        results.setdefault((protocol, concurrency, model), []).append(measured)
                        print(f"[bench-router] {protocol} c={concurrency} {model}: {measured}",
                              file=sys.stderr, flush=True)
    finally:
        stop_server(server, timeout=30)
        log.close()

    def median(protocol: str, concurrency: int, model: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(protocol, concurrency, model)])

    print(f"| protocol | concurrency | direct infer/s | router infer/s | router / direct | "
          f"direct p50 / p99 (ms) | router p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for protocol in ("http", "grpc"):
        for concurrency in (1, 8):
            direct = median(protocol, concurrency, DIRECT, "infer_per_s")
            routed = median(protocol, concurrency, ROUTER, "infer_per_s")
            latencies = {
                model: (median(protocol, concurrency, model, "p50_ms"),
                        median(protocol, concurrency, model, "p99_ms"))
                for model in (DIRECT, ROUTER)
            }
            print(f"| {protocol.upper() if protocol == 'http' else 'gRPC'} | {concurrency} | "
                  f"{direct:,.0f} | {routed:,.0f} | {routed / direct:.2f} | "
                  f"{latencies[DIRECT][0]:.2f} / {latencies[DIRECT][1]:.2f} | "
                  f"{latencies[ROUTER][0]:.2f} / {latencies[ROUTER][1]:.2f} |")
    print(f"\n(median of {rounds} rounds per cell; perf_analyzer measures 3 s windows until three agree within 25 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
