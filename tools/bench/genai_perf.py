"""genai-perf against the streaming model gpt2-small-stream, unchanged, as against a
model of Triton's vLLM backend: synthetic prompts of 16 tokens, `sampling_parameters`
asking for BENCH_OUTPUT_TOKENS new tokens, gRPC streaming, one run per concurrency.
genai-perf counts tokens by tokenizing the text it receives with the model's own
tokenizer.json (given as a local directory: no hub).

Run through scripts/bench-genai-perf.sh. Prints a Markdown table for BENCHMARKS.md.
    BENCH_CONCURRENCY (1,8), BENCH_INTERVAL_MS (4000), BENCH_OUTPUT_TOKENS (20)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from perf import REPO_ROOT, tritonserver

MODEL = "gpt2-small-stream"
REPOSITORY = REPO_ROOT / "model-repository"
INPUT_TOKENS = 16


def repository(workdir: Path) -> Path:
    """The streaming model as shipped (its version directories link to gpt2-small's)."""
    root = workdir / "repository"
    for model in ("gpt2-small", MODEL):
        shutil.copytree(REPOSITORY / model, root / model, symlinks=True)
    return root


def tokenizer_dir(workdir: Path) -> Path:
    """The model's tokenizer.json where transformers' AutoTokenizer finds it."""
    directory = workdir / "tokenizer"
    directory.mkdir()
    shutil.copyfile(REPOSITORY / "gpt2-small" / "1" / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def genai_perf(url: str, concurrency: int, workdir: Path, interval_ms: int, output_tokens: int) -> dict:
    """One genai-perf profile; returns its CSV export as {metric: {statistic: value}}."""
    artifacts = workdir / f"artifacts-c{concurrency}"
    command = [
        os.environ["GENAI_PERF"], "profile", "-m", MODEL,
        "--backend", "vllm", "--endpoint-type", "kserve", "--streaming", "-u", url,
        "--tokenizer", str(workdir / "tokenizer"),
        "--concurrency", str(concurrency), "--measurement-interval", str(interval_ms),
        "--num-prompts", "100", "--random-seed", "1",
        "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(output_tokens), "--artifact-dir", str(artifacts),
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"genai-perf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (export,) = artifacts.glob("*/profile_export_genai_perf.csv")
    figures: dict[str, dict[str, float]] = {}
    with open(export, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2 or row[0] == "Metric":
                continue
            values = [float(v.replace(",", "")) if v not in ("", "N/A") else None for v in row[1:]]
            figures[row[0]] = dict(zip(["avg", "min", "max", "p99", "p95", "p90", "p75", "p50"], values))
    return figures


def main() -> int:
    concurrencies = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,8").split(",")]
    interval = int(os.environ.get("BENCH_INTERVAL_MS", "4000"))
    output_tokens = int(os.environ.get("BENCH_OUTPUT_TOKENS", "20"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-genai-perf-"))
    tokenizer_dir(workdir)
    results = {}
    with tritonserver(repository(workdir), workdir) as server:
        for concurrency in concurrencies:
            results[concurrency] = genai_perf(
                f"127.0.0.1:{server['grpc']}", concurrency, workdir, interval, output_tokens)
            print(f"[bench-genai-perf] c={concurrency}: {results[concurrency]}", file=sys.stderr,
                  flush=True)

    def stat(figures: dict, metric: str, key: str) -> float:
        value = figures[metric][key]
        assert value is not None, (metric, key)
        return value

    print("| concurrency | time to first token p50 / p99 (ms) | inter-token latency p50 / p99 (ms) "
          "| output tokens/s | requests/s | output tokens per request (avg) |")
    print("|---:|---|---|---:|---:|---:|")
    for concurrency, figures in results.items():
        ttft, itl = "Time To First Token (ms)", "Inter Token Latency (ms)"
        print(f"| {concurrency} | {stat(figures, ttft, 'p50'):.2f} / {stat(figures, ttft, 'p99'):.2f} "
              f"| {stat(figures, itl, 'p50'):.2f} / {stat(figures, itl, 'p99'):.2f} "
              f"| {stat(figures, 'Output Token Throughput (tokens/sec)', 'avg'):,.0f} "
              f"| {stat(figures, 'Request Throughput (per sec)', 'avg'):,.1f} "
              f"| {stat(figures, 'Output Sequence Length (tokens)', 'avg'):.1f} |")
    if len(results) > 1:
        low, high = min(results), max(results)
        ratio = (stat(results[high], "Output Token Throughput (tokens/sec)", "avg")
                 / stat(results[low], "Output Token Throughput (tokens/sec)", "avg"))
        print(f"\n(output tokens/s, concurrency {high} / {low}: {ratio:.2f}×; "
              f"{interval} ms measurement windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
