"""A burst behind a long execution, on the bundled sentiment-classifier: one heavy request
(256 texts of 128 tokens, about 0.4 s), then 15 one-text requests at once while it runs.
How long the light requests take, from sending them to the last answer (and the heavy
one, for scale), and how many ONNX Runtime runs the 16 requests took
(`triton_rust_encoder_runs_total`), for:

- the shipped config: Triton's priority queue, two instances;
- the same on one instance;
- one instance without the `dynamic_batching` block (no priorities, no queue limits).

With priorities or a queue policy, Triton 2.51 hands a `max_batch_size: 0` model its
requests one at a time, at most two per instance ahead, and after a burst may leave the
rest to its scheduler's 0.5 s poll: the second row shows it, the first how two instances
avoid it.

Run through scripts/bench-burst.sh. Prints a Markdown table for BENCHMARKS.md.
    BENCH_BURSTS (10)
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from perf import REPO_ROOT, model_copy, tritonserver

MODEL = "sentiment-classifier"
HEAVY = [" ".join(f"word{i}" for i in range(200))] * 256
LIGHT = "Not good at all."
LIGHT_REQUESTS = 15
VARIANTS = {
    MODEL: "shipped: priority queue, 2 instances",
    "one-instance": "priority queue, 1 instance",
    "no-queue": "no `dynamic_batching` block, 1 instance",
}


def repository(workdir: Path) -> Path:
    """The shipped classifier's latest version three times: as shipped, on one instance,
    and on one instance without Triton's queue."""
    root = workdir / "repository"
    source = REPO_ROOT / "model-repository" / MODEL
    one = "{ count: 1, kind: KIND_CPU }"
    model_copy(source, root, MODEL, version="2")
    model_copy(source, root, "one-instance", version="2", instances=one)
    model_copy(source, root, "no-queue", version="2", instances=one)
    config = root / "no-queue" / "config.pbtxt"
    no_queue, removed = re.subn(r"\ndynamic_batching \{.*?\n\}\n", "\n", config.read_text(), flags=re.S)
    assert removed == 1, "the shipped config changed"
    config.write_text(no_queue)
    return root


def runs(metrics: str, model: str) -> float:
    text = requests.get(metrics, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "triton_rust_encoder_runs_total" and sample.labels["model"] == model)


def burst(base: str, metrics: str, model: str) -> tuple[float, float, float]:
    """(seconds from sending the light requests to the last answer, seconds the heavy one
    took, runs taken)."""
    url = f"{base}/v2/models/{model}/infer"
    before = runs(metrics, model)

    def send(texts: list[str]) -> float:
        body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
        response = requests.post(url, json=body, timeout=60, headers={"Connection": "close"})
        response.raise_for_status()
        return time.monotonic()

    with ThreadPoolExecutor(1 + LIGHT_REQUESTS) as pool:
        started = time.monotonic()
        heavy = pool.submit(send, HEAVY)
        time.sleep(0.05)
        lights_sent = time.monotonic()
        light = [pool.submit(send, [LIGHT]) for _ in range(LIGHT_REQUESTS)]
        last = max(future.result() for future in light)
        return last - lights_sent, heavy.result() - started, runs(metrics, model) - before


def main() -> int:
    bursts = int(os.environ.get("BENCH_BURSTS", "10"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tritonserver(repository(workdir), workdir) as server:
        base = f"http://127.0.0.1:{server['http']}"
        metrics = f"http://127.0.0.1:{server['metrics']}/metrics"
        for _ in range(bursts):
            for model in VARIANTS:
                results.setdefault(model, []).append(burst(base, metrics, model))
                print(f"[bench-burst] {model}: {results[model][-1]}", file=sys.stderr, flush=True)
    print("| config | 15 light requests: sent to last answer, median / max (ms) | "
          "the heavy request, median (ms) | runs for the 16, median / max |")
    print("|---|---:|---:|---:|")
    for model, label in VARIANTS.items():
        lights = [light * 1000 for light, _, _ in results[model]]
        heavy = statistics.median(heavy * 1000 for _, heavy, _ in results[model])
        taken = [count for _, _, count in results[model]]
        print(f"| {label} | {statistics.median(lights):.0f} / {max(lights):.0f} | {heavy:.0f} | "
              f"{statistics.median(taken):.0f} / {max(taken):.0f} |")
    print(f"\n({bursts} bursts per config, alternating)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
