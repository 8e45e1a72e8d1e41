"""What the serving benchmarks share: a tritonserver on free loopback ports, and one
perf_analyzer measurement (the meter Triton users know). PERF_ANALYZER, TRITONSERVER_BIN
and TRITON_RUST_BACKEND_DIR come from scripts/perf-analyzer-env.sh and common.sh."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soak"))
from soak import REPO_ROOT, free_port, stop_server, wait_ready  # noqa: E402,F401


@contextlib.contextmanager
def tritonserver(repository: Path, workdir: Path, args=(), backend_dir=None):
    """A ready server on `repository` (backends from `backend_dir`, default ours); yields
    its ports (http, grpc, metrics) and its process id (pid)."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    log = open(workdir / "tritonserver.log", "wb")
    server = subprocess.Popen([
        os.environ["TRITONSERVER_BIN"], f"--model-repository={repository}",
        f"--backend-directory={backend_dir or os.environ['TRITON_RUST_BACKEND_DIR']}",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
        f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}",
        f"--metrics-port={ports['metrics']}", *args,
    ], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, ORT_DISABLE_TELEMETRY="1"))
    try:
        if not wait_ready(f"http://127.0.0.1:{ports['http']}", server):
            sys.exit(f"tritonserver did not start; see {workdir / 'tritonserver.log'}")
        yield {**ports, "pid": server.pid}
    finally:
        stop_server(server, timeout=30)
        log.close()


def model_copy(source: Path, root: Path, name: str, parameters: dict[str, str] | None = None,
               version: str = "1", instances: str | None = None) -> None:
    """Model directory `source` as model `name` under `root`: one version, served as
    version 1 (the files of `source`'s `version`, linked, not copied: the real-size models
    are large), its warm-up data, and its config with `parameters` added and, if given,
    `instances` (e.g. "{ count: 1, kind: KIND_CPU }") as its instance group."""
    config = (source / "config.pbtxt").read_text()
    source_name = next(line for line in config.splitlines() if line.startswith("name:"))
    config = config.replace(source_name, f'name: "{name}"')
    if instances:
        shipped = next(line for line in config.splitlines() if line.startswith("instance_group"))
        config = config.replace(shipped, f"instance_group [ {instances} ]")
    policy = next(line for line in config.splitlines() if line.startswith("version_policy:"))
    config = config.replace(policy, "version_policy: { specific { versions: [1] } }")
    for key, value in (parameters or {}).items():
        config += f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
    (root / name / "1").mkdir(parents=True)
    for item in (source / version).iterdir():
        (root / name / "1" / item.name).symlink_to(item.resolve())
    shutil.copytree(source / "warmup", root / name / "warmup")
    (root / name / "config.pbtxt").write_text(config)


def text_only_data(workdir: Path, text: str) -> list[str]:
    """perf_analyzer arguments that send `text` as text_input [1] and no other input:
    --string-data would also fill the optional inputs (a generation model's
    sampling_parameters, which must be JSON)."""
    path = workdir / f"text-input-{abs(hash(text))}.json"
    path.write_text(json.dumps({"data": [{"text_input": {"content": [text], "shape": [1]}}]}))
    return ["--input-data", str(path)]


def perf_analyzer(model: str, protocol: str, url: str, concurrency: int, workdir: Path,
                  data_args, interval_ms: int = 3000, streaming: bool = False) -> dict:
    """One perf_analyzer measurement: infer/s, p50 and p99 latency (ms), and the
    stability it was measured at. `data_args` say what each request carries
    (--string-data/--shape, or --input-data). A shared 2-core machine is noisy: windows
    must agree within 25 %, else (an overloaded peer swings more) within 50 %.
    `streaming` (gRPC, decoupled models) also gives the time to the first response, p50
    and p99 (ms), from perf_analyzer's profile export, as genai-perf reads it."""
    for stability in (25, 50):
        stem = f"{model}-{protocol}-{concurrency}-{time.monotonic_ns()}"
        report = workdir / f"{stem}.csv"
        profile = workdir / f"{stem}.json"
        command = [
            os.environ["PERF_ANALYZER"], "-m", model, "-i", protocol, "-u", url,
            "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
            "--stability-percentage", str(stability), "--max-trials", "20", *data_args,
            "-f", str(report),
            *(["--streaming", "--profile-export-file", str(profile)] if streaming else []),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            break
        if "stable measurement" not in result.stdout + result.stderr or stability == 50:
            sys.exit(f"perf_analyzer failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(report, newline="") as file:
        (row,) = list(csv.DictReader(file))
    measured = {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "stability_percent": stability,
    }
    if streaming:
        measured.update(first_response_ms(profile))
    return measured


def first_response_ms(profile: Path) -> dict:
    """p50 and p99 of the time from each request to its first response (ms), over the
    requests of perf_analyzer's measurement windows."""
    (experiment,) = json.loads(profile.read_text())["experiments"]
    start, end = experiment["window_boundaries"][0], experiment["window_boundaries"][-1]
    times = sorted((r["response_timestamps"][0] - r["timestamp"]) / 1e6
                   for r in experiment["requests"]
                   if r["response_timestamps"] and start <= r["timestamp"] < end)
    if len(times) < 2:
        sys.exit(f"{profile}: too few requests in the measurement windows")
    quantiles = statistics.quantiles(times, n=100, method="inclusive")
    return {"ttft_p50_ms": statistics.median(times), "ttft_p99_ms": quantiles[98]}


def stability_note(results: dict) -> str:
    """How the measurements agreed, for a table's footnote: `results` maps a cell's key
    (a tuple) to its runs."""
    loose = sorted(" ".join(str(part) for part in key) for key, runs in results.items()
                   if any(run["stability_percent"] > 25 for run in runs))
    note = "perf_analyzer measures until three windows agree within 25 %"
    return note + (f" (within 50 % for {', '.join(loose)})" if loose else "")
