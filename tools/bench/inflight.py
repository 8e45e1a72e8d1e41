"""In-flight batching benchmark: the GPT-2 models as shipped (in-flight batching)
against copies that run one sequence at a time (`max_sequences_in_flight: 1`, how
generation ran before), one server, the same run, alternating, at concurrency 1 and 8,
with the shipped sampling defaults (temperature 0.7, 50 new tokens). perf_analyzer over
gRPC: `gpt2-small` answers once per request (generations/s); `gpt2-small-stream`
streams (`--streaming`), and its profile export gives each request's time to the first
token, as genai-perf reads it.

BENCH_REAL_SIZE=1 adds `gpt2-base`, a random-weight GPT-2 of real size (124M
parameters, context 1024, GPT-2's tokenizer; tools/bench/real_size.py builds it, about
500 MB) answering once per request, with 20 new tokens per request so a window holds
enough generations on a small machine.

Run through scripts/bench-inflight.sh (it sets up perf_analyzer):
    scripts/bench-inflight.sh                       # 3 rounds
    BENCH_ROUNDS=1 BENCH_INTERVAL_MS=2000 scripts/bench-inflight.sh
    BENCH_REAL_SIZE=1 scripts/bench-inflight.sh     # also the real-size GPT-2
Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import real_size
from perf import REPO_ROOT, model_copy, perf_analyzer, stability_note, text_only_data, tritonserver

SERIAL = "-serial"
PROMPT = "Once upon a time"
CONCURRENCY = (1, 8)


@dataclass(frozen=True)
class Case:
    model: str
    streaming: bool
    # Extra perf_analyzer arguments (request parameters) and the window, in ms.
    arguments: tuple[str, ...] = ()
    interval_ms: int | None = None


SHIPPED = (Case("gpt2-small", False), Case("gpt2-small-stream", True))
REAL_SIZE = Case("gpt2-base", False, ("--request-parameter", "max_new_tokens:20:int"), 20000)
# GPT-2 small's dimensions, as real_size.py's command line defaults give them.
GPT2_DIMS = type("Dims", (), dict(layers=12, hidden=768, heads=12, gpt2_vocab=50257, context=1024))


def add_model(root: Path, name: str, source: Path) -> None:
    """Version 1 of the model at `source` as `name`, and a copy that runs one sequence
    at a time."""
    model_copy(source, root, name)
    model_copy(source, root, name + SERIAL,
               {"max_sequences_in_flight": "1", "max_prompts_per_request": "1"})


def repository(workdir: Path, cases: list[Case]) -> Path:
    root = workdir / "repository"
    for case in cases:
        source = REPO_ROOT / "model-repository" / case.model
        if case == REAL_SIZE:
            source = real_size.write_model(workdir / "built", case.model, "text-generation",
                                           GPT2_DIMS)
        add_model(root, case.model, source)
    return root


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    interval = int(os.environ.get("BENCH_INTERVAL_MS", "4000"))
    cases = [*SHIPPED, *([REAL_SIZE] if os.environ.get("BENCH_REAL_SIZE") == "1" else [])]
    workdir = Path(tempfile.mkdtemp(prefix="bench-inflight-"))
    data = [*text_only_data(workdir, PROMPT), "-x", "1"]
    results: dict[tuple[str, int], list[dict]] = {}
    with tritonserver(repository(workdir, cases), workdir) as server:
        url = f"127.0.0.1:{server['grpc']}"
        for round_index in range(rounds):
            for case in cases:
                pair = (case.model, case.model + SERIAL)
                for concurrency in CONCURRENCY:
                    # Alternate which goes first, so drift in the machine favours neither.
                    for model in pair if round_index % 2 == 0 else pair[::-1]:
                        measured = perf_analyzer(model, "grpc", url, concurrency, workdir,
                                                 [*data, *case.arguments],
                                                 case.interval_ms or interval,
                                                 streaming=case.streaming)
                        results.setdefault((model, concurrency), []).append(measured)
                        print(f"[bench-inflight] c={concurrency} {model}: {measured}",
                              file=sys.stderr, flush=True)

    def median(model: str, concurrency: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(model, concurrency)])

    labels = ((SERIAL, "one sequence at a time"), ("", "in-flight (shipped)"))
    print("| model | batching | concurrency | generations/s | latency p50 / p99 (ms) | "
          "time to first token p50 / p99 (ms) |")
    print("|---|---|---:|---:|---|---|")
    for case in cases:
        for suffix, label in labels:
            model = case.model + suffix
            for concurrency in CONCURRENCY:
                first = (f"{median(model, concurrency, 'ttft_p50_ms'):.1f} / "
                         f"{median(model, concurrency, 'ttft_p99_ms'):.1f}" if case.streaming else "—")
                print(f"| `{case.model}` | {label} | {concurrency} | "
                      f"{median(model, concurrency, 'infer_per_s'):.1f} | "
                      f"{median(model, concurrency, 'p50_ms'):.1f} / {median(model, concurrency, 'p99_ms'):.1f} | "
                      f"{first} |")

    def ratio(model: str, key: str) -> str:
        """Concurrency 8's median over concurrency 1's, then each round's own ratio (its
        two cells were measured back to back), so a ratio's spread shows beside it."""
        overall = f"{median(model, 8, key) / median(model, 1, key):.2f}×"
        if rounds < 2:
            return overall
        each = ", ".join(f"{eight[key] / one[key]:.2f}×"
                         for one, eight in zip(results[(model, 1)], results[(model, 8)]))
        return f"{overall} (rounds: {each})"

    print("\n| concurrency 8 / concurrency 1 | batching | generations/s | time to first token p99 |")
    print("|---|---|---:|---:|")
    for case in cases:
        for suffix, label in labels:
            model = case.model + suffix
            ttft = ratio(model, "ttft_p99_ms") if case.streaming else "—"
            print(f"| `{case.model}` | {label} | {ratio(model, 'infer_per_s')} | {ttft} |")
    print(f"\n(median of {rounds} rounds per cell of {interval} ms windows"
          f"{', 20000 ms for gpt2-base' if REAL_SIZE in cases else ''}; {stability_note(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
