"""Requests of megabyte texts, on the bundled gpt2-small and sentiment-classifier: one
gRPC request of BENCH_TEXTS (16) texts of 1 MiB each, and the worst latency of the
one-text requests another client sends to the same model meanwhile (they wait while
the big one is tokenized on the instance's thread).

Two kinds of megabyte: English words, of which the backend tokenizes only the end that
the kept tokens come from (a few kilobytes), and one letter repeated, which has no word
end to cut at and is tokenized whole, as every text was before (README, "Limits"). Both
in the same run, alternating.

Run through scripts/bench-long-texts.sh. Prints a Markdown table for BENCHMARKS.md.
    BENCH_TEXTS (16), BENCH_ROUNDS (2)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient

from perf import REPO_ROOT, model_copy, tritonserver

MODELS = ("gpt2-small", "sentiment-classifier")
MIB = 1 << 20
TEXTS = {
    "words": ("The quick brown fox jumps over the lazy dog. " * (MIB // 45 + 1))[:MIB],
    "one letter, no word end": "x" * MIB,
}
GENERATION = {"max_new_tokens": 1, "do_sample": False}


def repository(workdir: Path) -> Path:
    root = workdir / "repository"
    for model in MODELS:
        model_copy(REPO_ROOT / "model-repository" / model, root, model, version="2")
    return root


def big_request(grpc_url: str, model: str, text: str, count: int) -> float:
    """Seconds the request of `count` copies of `text` takes."""
    client = grpcclient.InferenceServerClient(grpc_url)
    texts = grpcclient.InferInput("text_input", [count], "BYTES")
    texts.set_data_from_numpy(np.array([text.encode()] * count, dtype=object))
    started = time.monotonic()
    client.infer(model, [texts], parameters=GENERATION if model.startswith("gpt2") else None,
                 client_timeout=600)
    return time.monotonic() - started


def measure(http_url: str, grpc_url: str, model: str, text: str, count: int) -> tuple[float, float]:
    """(seconds the big request took, worst seconds of a one-text request meanwhile)."""
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hello there"]}]}
    if model.startswith("gpt2"):
        body["parameters"] = GENERATION
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(big_request, grpc_url, model, text, count)
        worst = 0.0
        while True:
            time.sleep(0.02)
            started = time.monotonic()
            requests.post(f"{http_url}/v2/models/{model}/infer", json=body, timeout=600).raise_for_status()
            worst = max(worst, time.monotonic() - started)
            if big.done():
                break
        return big.result(), worst


def main() -> int:
    count = int(os.environ.get("BENCH_TEXTS", "16"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-long-texts-"))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tritonserver(repository(workdir), workdir) as server:
        http_url, grpc_url = f"http://127.0.0.1:{server['http']}", f"127.0.0.1:{server['grpc']}"
        for _ in range(rounds):
            for model in MODELS:
                for kind, text in TEXTS.items():
                    results.setdefault((model, kind), []).append(
                        measure(http_url, grpc_url, model, text, count))
                    print(f"[bench-long-texts] {model}, {kind}: {results[(model, kind)][-1]}",
                          file=sys.stderr, flush=True)
    print(f"| model | {count} texts of 1 MiB | the request (s) | worst one-text request meanwhile (s) |")
    print("|---|---|---:|---:|")
    for (model, kind), runs in results.items():
        big = statistics.median(seconds for seconds, _ in runs)
        worst = max(seconds for _, seconds in runs)
        print(f"| `{model}` | {kind} | {big:.2f} | {worst:.2f} |")
    for model in MODELS:
        words, letters = (statistics.median(s for s, _ in results[(model, kind)]) for kind in TEXTS)
        print(f"\n`{model}`: the request of words takes {words / letters:.3f} of the time of the "
              "one tokenized whole.", end="")
    print(f"\n\n(median of {rounds} rounds, alternating; worst latency over all rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
