"""Batching across executions for an encoder of real size: the random-weight
RoBERTa-base-size classifier (tools/bench/real_size.py, 110M parameters) with the
exported config (`max_batch_size: 0`, the classic one-text payload of shape [1], two
instances of one intra-op thread), as shipped (requests that queue while an execution
runs go into the next one together), the same on one instance, and with
`batch_requests: false` (one request per execution, as before), one server, the same
run, alternating. perf_analyzer over HTTP, one text per request, concurrency 1 and 8.

Run through scripts/bench-encoder-batching.sh. Prints Markdown tables for BENCHMARKS.md.
    BENCH_ROUNDS (3), BENCH_INTERVAL_MS (5000)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import types
from pathlib import Path

import real_size
from perf import model_copy, perf_analyzer, stability_note, tritonserver

MODEL = "classifier-base"
ONE_INSTANCE = MODEL + "-one-instance"
SERIAL = MODEL + "-serial"
TEXT = "The service was quick and the staff were friendly."
CONCURRENCY = (1, 8)


def repository(workdir: Path) -> Path:
    dims = types.SimpleNamespace(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, positions=512)
    built = real_size.write_model(workdir / "built", MODEL, "sentiment-classifier", dims)
    config = (built / "config.pbtxt").read_text()
    assert f'name: "{MODEL}"' in config and "max_batch_size: 0" in config, "the rendered config changed"
    root = workdir / "repository"
    model_copy(built, root, MODEL)
    model_copy(built, root, ONE_INSTANCE, instances="{ count: 1, kind: KIND_CPU }")
    model_copy(built, root, SERIAL, {"batch_requests": "false"})
    return root


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    interval = int(os.environ.get("BENCH_INTERVAL_MS", "5000"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-encoder-batching-"))
    data = ["--string-data", TEXT, "--shape", "text_input:1"]
    results: dict[tuple[str, int], list[dict]] = {}
    with tritonserver(repository(workdir), workdir) as server:
        url = f"127.0.0.1:{server['http']}"
        for round_index in range(rounds):
            for concurrency in CONCURRENCY:
                models = (MODEL, ONE_INSTANCE, SERIAL)
                for model in models if round_index % 2 == 0 else models[::-1]:
                    measured = perf_analyzer(model, "http", url, concurrency, workdir, data, interval)
                    results.setdefault((model, concurrency), []).append(measured)
                    print(f"[bench-encoder-batching] c={concurrency} {model}: {measured}",
                          file=sys.stderr, flush=True)

    def median(model: str, concurrency: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(model, concurrency)])

    labels = ((SERIAL, "one request per execution, 2 instances"),
              (ONE_INSTANCE, "batched across executions, 1 instance"),
              (MODEL, "batched across executions, 2 instances (shipped)"))
    print("| batching | concurrency | infer/s | p50 / p99 (ms) |")
    print("|---|---:|---:|---|")
    for model, label in labels:
        for concurrency in CONCURRENCY:
            print(f"| {label} | {concurrency} | {median(model, concurrency, 'infer_per_s'):.1f} | "
                  f"{median(model, concurrency, 'p50_ms'):.1f} / {median(model, concurrency, 'p99_ms'):.1f} |")
    print("\n| batching | infer/s, concurrency 8 / 1 | p99 at concurrency 8 / p50 at concurrency 1 |")
    print("|---|---:|---:|")
    for model, label in labels:
        print(f"| {label} | {median(model, 8, 'infer_per_s') / median(model, 1, 'infer_per_s'):.2f}× | "
              f"{median(model, 8, 'p99_ms') / median(model, 1, 'p50_ms'):.2f}× |")
    print(f"\n(median of {rounds} rounds per cell of {interval} ms windows; {stability_note(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
