"""Serving benchmark: our models against their Python-backend peers (tools/bench/python_peer:
Triton's Python backend + onnxruntime + tokenizers on the same ONNX file and tokenizer,
all requests of an execute call in one padded batch, the same threads), one server, the
same run, alternating, HTTP and gRPC, concurrency 1, 8 and 32, measured by perf_analyzer
with the classic payload (one text, shape [1]):

- `sentiment-classifier` and `sentiment-classifier-python`;
- `gpt2-small` and `gpt2-small-python` (50 sampled new tokens, the config's defaults).

Also the server-side compute per request (Triton's statistics, at the lowest concurrency)
against ONNX Runtime called in-process on the same input (classifiers: tokenize + run, one
thread): the backend's overhead. BENCH_REAL_SIZE=1 adds random-weight models of real size
(tools/bench/real_size.py, about 1 GB in all): a RoBERTa-base-size classifier and GPT-2
124M (20 new tokens), each with its peer, at concurrency 1 and 8.

Run through scripts/bench-serving.sh (it sets up perf_analyzer and the peers' packages):
    scripts/bench-serving.sh                 # 3 rounds
    BENCH_ROUNDS=1 BENCH_CONCURRENCY=1 BENCH_INTERVAL_MS=1000 scripts/bench-serving.sh  # CI smoke
    BENCH_REAL_SIZE=1 BENCH_ROUNDS=1 scripts/bench-serving.sh
Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import requests

import real_size
from perf import REPO_ROOT, model_copy, perf_analyzer, stability_note, text_only_data, tritonserver

TEXT = "This is a great day!"
PROMPT = "Once upon a time"
PEERS = Path(__file__).resolve().parent / "python_peer"
PYTHON_BACKEND = REPO_ROOT / ".deps" / "pytriton" / "pytriton" / "tritonserver"
PROTOCOLS = ("http", "grpc")
REAL_SIZE_CONCURRENCY = (1, 8)


@dataclass(frozen=True)
class Pair:
    """One of our models and its Python-backend peer."""

    ours: str
    peer_code: str  # the peer's directory under tools/bench/python_peer
    task: str
    text: str  # what each request carries: one text as text_input [1]
    real_size: bool = False
    interval_ms: int | None = None  # the measurement window, where the default is short
    new_tokens: int | None = None  # the config's max_new_tokens, where not the shipped 50

    @property
    def peer(self) -> str:
        return f"{self.ours}-python"

    @property
    def version(self) -> str:
        """The version served: the shipped models' latest, the built ones' only."""
        return "1" if self.real_size else "2"


TINY = [
    Pair("sentiment-classifier", "sentiment-classifier-python", "sentiment-classifier", TEXT),
    Pair("gpt2-small", "gpt2-small-python", "text-generation", PROMPT),
]
REAL_SIZE = [
    Pair("classifier-base", "sentiment-classifier-python", "sentiment-classifier", TEXT,
         real_size=True, interval_ms=5000),
    Pair("gpt2-base", "gpt2-small-python", "text-generation", PROMPT, real_size=True,
         interval_ms=20000, new_tokens=20),
]
ENCODER_DIMS = types.SimpleNamespace(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, positions=512)
GPT2_DIMS = types.SimpleNamespace(layers=12, hidden=768, heads=12, gpt2_vocab=50257, context=1024)


def rate(per_s: float) -> str:
    """Three significant digits or more: the real-size GPT-2 answers about once a second."""
    return f"{per_s:,.1f}" if per_s >= 10 else f"{per_s:.2f}"


def site_packages() -> list[str]:
    """Where the peers (and the in-process measurement) find onnxruntime and tokenizers,
    and the peers their shared code (python_peer/peer_common.py)."""
    return [str(REPO_ROOT / ".deps" / "onnxruntime"), str(REPO_ROOT / ".deps" / "python-peer"), str(PEERS)]


def add_peer(root: Path, pair: Pair, source: Path) -> None:
    """The peer of `pair` on the files and config of `source`'s served version."""
    peer = root / pair.peer
    shutil.copytree(PEERS / pair.peer_code, peer, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("model.onnx", "tokenizer.json"):
        (peer / "1" / name).symlink_to((source / pair.version / name).resolve())
    shutil.copytree(source / "warmup", peer / "warmup")
    config = (root / pair.ours / "config.pbtxt").read_text()
    source_name = next(line for line in config.splitlines() if line.startswith("name:"))
    for old, new in [(source_name, f'name: "{pair.peer}"'), ('backend: "rust"', 'backend: "python"')]:
        assert old in config, f"the config changed: {old!r}"
        config = config.replace(old, new)
    config = "".join(line for line in config.splitlines(keepends=True) if not line.startswith("version_policy"))
    config += ('parameters: { key: "site_packages", value: { string_value: "'
               + ":".join(site_packages()) + '" } }\n')
    (peer / "config.pbtxt").write_text(config)


def repository(workdir: Path, pairs: list[Pair]) -> Path:
    """Each pair's model (the shipped one, or one built at real size) and its peer."""
    root = workdir / "repository"
    for pair in pairs:
        if pair.real_size:
            dims = GPT2_DIMS if pair.task == "text-generation" else ENCODER_DIMS
            source = real_size.write_model(workdir / "built", pair.ours, pair.task, dims)
            model_copy(source, root, pair.ours)
        else:
            source = REPO_ROOT / "model-repository" / pair.ours
            shutil.copytree(source, root / pair.ours)
        if pair.new_tokens:
            # In the config, so that both protocols and the peer use it (perf_analyzer's
            # --request-parameter is gRPC only).
            config = root / pair.ours / "config.pbtxt"
            shipped = 'key: "max_new_tokens", value: { string_value: "50" }'
            assert shipped in config.read_text(), "the rendered config changed"
            config.write_text(config.read_text().replace(shipped, shipped.replace("50", str(pair.new_tokens))))
        add_peer(root, pair, source)
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


def in_process_us(model_file: Path, tokenizer_file: Path, repetitions: int) -> float:
    """Tokenize + run for the benchmark's text, ONNX Runtime in this process, one thread."""
    sys.path[:0] = site_packages()
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    names = {i.name for i in session.get_inputs()}

    def once():
        ids = np.array([tokenizer.encode(TEXT).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        session.run(["logits"], feeds)

    for _ in range(max(repetitions // 20, 5)):
        once()
    started = time.perf_counter()
    for _ in range(repetitions):
        once()
    return (time.perf_counter() - started) / repetitions * 1e6


def main() -> int:
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    concurrencies = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,8,32").split(",")]
    interval = int(os.environ.get("BENCH_INTERVAL_MS", "3000"))
    pairs = TINY + (REAL_SIZE if os.environ.get("BENCH_REAL_SIZE") == "1" else [])
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    root = repository(workdir, pairs)
    results: dict[tuple[str, str, int], list[dict]] = {}

    def cells(pair: Pair) -> list[tuple[str, int]]:
        levels = [c for c in concurrencies if c in REAL_SIZE_CONCURRENCY] if pair.real_size else concurrencies
        return [(protocol, concurrency) for protocol in PROTOCOLS for concurrency in levels]

    with tritonserver(root, workdir, backend_dir=backends(workdir)) as server:
        base = f"http://127.0.0.1:{server['http']}"
        for pair in pairs:
            versions = {pair.ours: pair.version, pair.peer: "1"}
            data = text_only_data(workdir, pair.text)
            for protocol, concurrency in cells(pair):
                url = f"127.0.0.1:{server[protocol]}"
                for round_index in range(rounds):
                    # Alternate which goes first, so drift in the machine favours neither.
                    order = (pair.ours, pair.peer) if round_index % 2 == 0 else (pair.peer, pair.ours)
                    for model in order:
                        before = compute_us(base, model, versions[model])
                        measured = perf_analyzer(model, protocol, url, concurrency, workdir, data,
                                                 pair.interval_ms or interval)
                        after = compute_us(base, model, versions[model])
                        measured["compute_us"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                        results.setdefault((model, protocol, concurrency), []).append(measured)
                        print(f"[bench-serving] {protocol} c={concurrency} {model}: {measured}",
                              file=sys.stderr, flush=True)

    def median(model: str, key: str, protocol: str | None = None, concurrency: int | None = None) -> float:
        return statistics.median(
            run[key] for (name, p, c), runs in results.items() for run in runs
            if name == model and protocol in (None, p) and concurrency in (None, c))

    print("| model | protocol | concurrency | Python peer infer/s | ours infer/s | ours / peer | "
          "peer p50 / p99 (ms) | ours p50 / p99 (ms) |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for pair in pairs:
        for protocol, concurrency in cells(pair):
            cell = {m: [median(m, key, protocol, concurrency) for key in ("infer_per_s", "p50_ms", "p99_ms")]
                    for m in (pair.peer, pair.ours)}
            peer, ours = cell[pair.peer], cell[pair.ours]
            print(f"| `{pair.ours}` | {'HTTP' if protocol == 'http' else 'gRPC'} | {concurrency} | "
                  f"{rate(peer[0])} | {rate(ours[0])} | {ours[0] / peer[0]:.2f} | "
                  f"{peer[1]:.2f} / {peer[2]:.2f} | {ours[1]:.2f} / {ours[2]:.2f} |")

    # At the lowest concurrency: above it, our compute time includes the wait for the
    # instance's batch under way (the request is queued inside the backend).
    lowest = min(concurrencies)
    print(f"\n| model | server-side compute per request at concurrency {lowest} (µs): Python peer | "
          "ours | ONNX Runtime in-process | ours / in-process |")
    print("|---|---:|---:|---:|---:|")
    for pair in pairs:
        peer, ours = (median(model, "compute_us", concurrency=lowest) for model in (pair.peer, pair.ours))
        if pair.task == "text-generation":
            print(f"| `{pair.ours}` | {peer:,.0f} | {ours:,.0f} | — | — |")
            continue
        served = root / pair.ours / pair.version
        in_process = in_process_us(served / "model.onnx", served / "tokenizer.json",
                                   100 if pair.real_size else 2000)
        print(f"| `{pair.ours}` | {peer:,.0f} | {ours:,.0f} | {in_process:,.0f} | {ours / in_process:.2f} |")
    print(f"\n(median of {rounds} rounds per cell of {interval} ms windows"
          f"{'; 5000 ms for classifier-base, 20000 ms for gpt2-base' if REAL_SIZE[0] in pairs else ''}; "
          f"{stability_note(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
