"""Router overhead: requests/s and latency through `sentiment-classifier-ab` (the A/B
router, 50/50 over versions 1 and 2) against `sentiment-classifier` directly, same server,
same run, measured by perf_analyzer (the meter Triton users know), alternating the two.

Run through scripts/bench-router.sh (it sets up perf_analyzer's runtime):
    scripts/bench-router.sh                 # 3 rounds, concurrency 1 and 8, HTTP and gRPC
    BENCH_ROUNDS=1 scripts/bench-router.sh  # a quick run
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import requests

from perf import REPO_ROOT, perf_analyzer, stability_note, tritonserver

DIRECT, ROUTER = "sentiment-classifier", "sentiment-classifier-ab"
TEXT = "This is a great day!"


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-router-"))
    data = ["--string-data", TEXT, "--shape", "text_input:1"]
    results: dict[tuple[str, int, str], list[dict]] = {}
    args = ["--model-control-mode=explicit", f"--load-model={DIRECT}", f"--load-model={ROUTER}"]
    with tritonserver(REPO_ROOT / "model-repository", workdir, args) as ports:
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
                        measured = perf_analyzer(model, protocol, url, concurrency, workdir, data)
                        results.setdefault((protocol, concurrency, model), []).append(measured)
                        print(f"[bench-router] {protocol} c={concurrency} {model}: {measured}",
                              file=sys.stderr, flush=True)

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
    print(f"\n(median of {rounds} rounds per cell of 3 s windows; {stability_note(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
