"""Length-aware batching: perf_analyzer on a mixed-length load (requests of 8 texts, a
quarter of them long) against `sentiment-classifier`, which runs rows of very different
lengths as separate batches, and `sentiment-classifier-padded`, the same model with
`group_by_length: false` (one batch padded to its longest text), same server, same run,
alternating. The tokens each fed to ONNX Runtime, padding included, over the tokens of
the texts come from the backend's triton_rust_encoder_* counters.

Run through scripts/bench-padding.sh (it sets up perf_analyzer's runtime):
    scripts/bench-padding.sh                 # 3 rounds, concurrency 1 and 8, HTTP
    BENCH_ROUNDS=1 scripts/bench-padding.sh  # a quick run
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from perf import REPO_ROOT, perf_analyzer, stability_note, tritonserver

GROUPED = "sentiment-classifier"
PADDED = "sentiment-classifier-padded"
TEXTS_PER_REQUEST = 8
WORDS = "the service was quick and friendly but the food arrived cold and late again".split()


def mixed_requests(count: int = 32, seed: int = 7) -> dict:
    """perf_analyzer input data: `count` requests of 8 texts, each short (3 to 12 words)
    or, one time in four, long (60 to 110 words)."""
    rng = random.Random(seed)
    entries = []
    for _ in range(count):
        texts = []
        for _ in range(TEXTS_PER_REQUEST):
            words = rng.randint(60, 110) if rng.random() < 0.25 else rng.randint(3, 12)
            texts.append(" ".join(rng.choice(WORDS) for _ in range(words)))
        entries.append({"text_input": {"content": texts, "shape": [TEXTS_PER_REQUEST]}})
    return {"data": entries}


def repository(workdir: Path) -> Path:
    """The shipped classifier, and a copy of it that pads every request as one batch."""
    root = workdir / "repository"
    shutil.copytree(REPO_ROOT / "model-repository" / GROUPED, root / GROUPED)
    shutil.copytree(REPO_ROOT / "model-repository" / GROUPED, root / PADDED)
    config = root / PADDED / "config.pbtxt"
    text = config.read_text().replace(f'name: "{GROUPED}"', f'name: "{PADDED}"')
    config.write_text(text + 'parameters: { key: "group_by_length", value: { string_value: "false" } }\n')
    return root


def counters(metrics_url: str, model: str) -> dict[str, float]:
    text = requests.get(metrics_url, timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("triton_rust_encoder_") and sample.labels["model"] == model
        and sample.labels["version"] == "2"
    }


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-padding-"))
    data_file = workdir / "mixed.json"
    data_file.write_text(json.dumps(mixed_requests()))
    data = ["--input-data", str(data_file)]
    results: dict[tuple[int, str], list[dict]] = {}
    with tritonserver(repository(workdir), workdir) as ports:
        url = f"127.0.0.1:{ports['http']}"
        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        for concurrency in (1, 8):
            for round_index in range(rounds):
                # Alternate which goes first, so drift in the machine favours neither.
                order = (GROUPED, PADDED) if round_index % 2 == 0 else (PADDED, GROUPED)
                for model in order:
                    before = counters(metrics_url, model)
                    measured = perf_analyzer(model, "http", url, concurrency, workdir, data)
                    after = counters(metrics_url, model)
                    fed = after["triton_rust_encoder_fed_tokens_total"] - before["triton_rust_encoder_fed_tokens_total"]
                    real = after["triton_rust_encoder_tokens_total"] - before["triton_rust_encoder_tokens_total"]
                    measured["fed_per_token"] = fed / real
                    results.setdefault((concurrency, model), []).append(measured)
                    print(f"[bench-padding] c={concurrency} {model}: {measured}", file=sys.stderr, flush=True)

    def median(concurrency: int, model: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(concurrency, model)])

    print("| concurrency | tokens fed per text token, padded / grouped | padded infer/s | "
          "grouped infer/s | grouped / padded | padded p50 / p99 (ms) | grouped p50 / p99 (ms) |")
    print("|---:|---|---:|---:|---:|---|---|")
    for concurrency in (1, 8):
        padded, grouped = (median(concurrency, m, "infer_per_s") for m in (PADDED, GROUPED))
        latency = {m: (median(concurrency, m, "p50_ms"), median(concurrency, m, "p99_ms"))
                   for m in (PADDED, GROUPED)}
        print(f"| {concurrency} | {median(concurrency, PADDED, 'fed_per_token'):.2f} / "
              f"{median(concurrency, GROUPED, 'fed_per_token'):.2f} | {padded:,.0f} | {grouped:,.0f} | "
              f"{grouped / padded:.2f} | {latency[PADDED][0]:.2f} / {latency[PADDED][1]:.2f} | "
              f"{latency[GROUPED][0]:.2f} / {latency[GROUPED][1]:.2f} |")
    print(f"\n(median of {rounds} rounds per cell of 3 s windows; {stability_note(results)}; requests "
          "of 8 texts, a quarter of them 60 to 110 words, the rest 3 to 12)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
