"""Soak: N minutes of mixed good and bad traffic over HTTP and gRPC, streaming clients
that go away mid-stream, and a model reloaded every few seconds, against a real
tritonserver with libtriton_rust.so (started here, on loopback ports).

It fails (exit 1) on any lost request (sent and never answered within its timeout),
any wrong answer (a good request that does not succeed, a bad one that is not refused
with a 4xx naming the problem), a server that dies, or server RSS that grows by more
than 5 % from the first fifth of the run after the warm-up to its last fifth (medians
of a sample taken just before each reload, or every 5 s without reloads: RSS swings by
several MiB while a reload holds two sets of versions).

Run through scripts/soak.sh (it sets up the environment): `scripts/soak.sh 30`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUEST_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(texts, name="text_input"):
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}


# (model, body, expected status): good requests must get 200, bad ones a 4xx whose
# message contains the fragment.
HTTP_CASES = [
    ("sentiment-classifier", {"inputs": [text(["A fine day."])]}, 200, ""),
    ("bert-base", {"inputs": [text(["The quick brown fox."])], "outputs": [{"name": "embedding"}]}, 200, ""),
    ("gpt2-small", {"inputs": [text(["Hello"])], "parameters": {"max_new_tokens": 4, "seed": 1}}, 200, ""),
    ("sentiment-classifier-ab", {"inputs": [text(["Routed."])]}, 200, ""),
    ("sentiment-classifier", {"inputs": [text(["fine", " "])]}, 400, "is empty"),
    ("sentiment-classifier", {"inputs": [text(["a"] * 300)]}, 400, "max_texts_per_request"),
    ("gpt2-small", {"inputs": [text(["Hi"])], "parameters": {"temperature": 1e-40}}, 400, "temperature"),
    ("gpt2-small", {"inputs": [text(["Hi"])], "parameters": {"stop_sequences": "[1]"}}, 400, "stop_sequences"),
    ("bert-base", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 99999]},
                              {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]}]},
     400, "outside the vocabulary"),
    ("sentiment-classifier-ab", {"inputs": [text([""])]}, 400, "is empty"),
]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.problems: list[str] = []

    def add(self, kind: str, problem: str | None = None):
        with self.lock:
            self.counts[kind] += 1
            if problem and len(self.problems) < 50:
                self.problems.append(problem)


def http_traffic(url, stop, tally):
    session = requests.Session()
    while not stop.is_set():
        model, body, status, fragment = random.choice(HTTP_CASES)
        tally.add("sent")
        try:
            response = session.post(f"{url}/v2/models/{model}/infer", json=body, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as error:
            tally.add("lost", f"http {model}: {error}")
            continue
        tally.add("answered")
        message = response.text
        if response.status_code != status or fragment not in message:
            tally.add("wrong", f"http {model}: {response.status_code} {message[:200]}")
        else:
            tally.add("good" if status == 200 else "refused")


def grpc_traffic(grpc_url, stop, tally):
    client = grpcclient.InferenceServerClient(grpc_url)
    while not stop.is_set():
        bad = random.random() < 0.3
        texts = ["fine", ""] if bad else ["A good day.", "A bad day."]
        tensor = grpcclient.InferInput("text_input", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        tally.add("sent")
        try:
            client.infer("sentiment-classifier", [tensor], client_timeout=REQUEST_TIMEOUT)
            tally.add("answered")
            if bad:
                tally.add("wrong", "grpc: an empty text was accepted")
            else:
                tally.add("good")
        except InferenceServerException as error:
            if "Deadline" in str(error.status()) or "UNAVAILABLE" in str(error.status()):
                tally.add("lost", f"grpc: {error}")
                continue
            tally.add("answered")
            if bad and "is empty" in error.message():
                tally.add("refused")
            else:
                tally.add("wrong", f"grpc: {error.status()} {error.message()[:200]}")
    client.close()


def streaming_traffic(url, stop, tally):
    """SSE clients that read a few pieces of a long generation, then go away."""
    body = {"text_input": "Once upon a time", "parameters": {"max_new_tokens": 100, "seed": 3}}
    while not stop.is_set():
        tally.add("sent")
        try:
            with requests.post(f"{url}/v2/models/gpt2-small-stream/generate_stream", json=body,
                               stream=True, timeout=REQUEST_TIMEOUT) as response:
                pieces = 0
                for line in response.iter_lines():
                    if line.startswith(b"data:"):
                        pieces += 1
                    if pieces >= random.randint(1, 5):
                        break
            tally.add("answered")
            tally.add("good" if response.status_code == 200 and pieces else "wrong",
                      None if pieces else f"stream: {response.status_code}")
        except requests.RequestException as error:
            tally.add("lost", f"stream: {error}")


def classifier_config(labels: str) -> str:
    """sentiment-classifier's configuration with other label names: loading it replaces
    the serving versions (a load of unchanged files would keep them)."""
    return json.dumps({
        "name": "sentiment-classifier", "backend": "rust", "max_batch_size": 0,
        "version_policy": {"all": {}},
        "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [{"name": "sentiment_score", "data_type": "TYPE_FP32", "dims": [-1, 3]},
                   {"name": "sentiment_label", "data_type": "TYPE_STRING", "dims": [-1]}],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {"task": {"string_value": "sentiment-classifier"},
                       "labels": {"string_value": labels}},
    })


def reloader(url, stop, tally, every: float, fast_until: float, pid: int, rss_samples: list):
    """Reloads every `every` seconds; every half second until `fast_until` (the warm-up:
    the allocator settles after about a hundred reloads, 1-2 MiB above where it starts,
    and only growth after that is counted). After the warm-up it samples the server's
    RSS just before each reload: always at the same point of the reload cycle, when one
    set of versions is loaded (during a reload both the old and the new are)."""
    configs = [classifier_config("negative,neutral,positive"), classifier_config("bad,meh,good")]
    while not stop.wait(0.5 if time.monotonic() < fast_until else every):
        if time.monotonic() >= fast_until:
            rss_samples.append(rss_mib(pid))
        body = {"parameters": {"config": configs[tally.counts["reloads"] % 2]}}
        response = requests.post(f"{url}/v2/repository/models/sentiment-classifier/load",
                                 json=body, timeout=120)
        tally.add("reloads")
        if response.status_code != 200:
            tally.add("wrong", f"reload: {response.status_code} {response.text[:200]}")


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120) -> bool:
    """Whether the server at `url` became ready before it exited or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def stop_server(server: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (tritonserver drains in-flight requests), then SIGKILL after `timeout`."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", type=float, help="how long the traffic runs")
    parser.add_argument("--warmup", type=float, default=60,
                        help="seconds of traffic and fast reloads before the RSS baseline")
    parser.add_argument("--reload-every", type=float, default=5, help="seconds between reloads")
    parser.add_argument("--clients", type=int, default=4, help="HTTP client threads")
    parser.add_argument("--log", default="soak-tritonserver.log")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["grpc", "stream", "reload"],
                        help="leave out one kind of traffic (to find what a failure comes from)")
    args = parser.parse_args()

    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    url = f"http://127.0.0.1:{ports['http']}"
    log = open(args.log, "wb")
    server = subprocess.Popen([
        os.environ["TRITONSERVER_BIN"], f"--model-repository={REPO_ROOT / 'model-repository'}",
        f"--backend-directory={os.environ['TRITON_RUST_BACKEND_DIR']}",
        "--model-control-mode=explicit", "--load-model=*",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
        f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}", f"--metrics-port={ports['metrics']}",
    ], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, ORT_DISABLE_TELEMETRY="1"))
    try:
        if not wait_ready(url, server):
            print(f"tritonserver did not start; see {args.log}", file=sys.stderr)
            return 1

        tally, stop = Tally(), threading.Event()
        reload_samples: list[float] = []
        workers = [threading.Thread(target=http_traffic, args=(url, stop, tally)) for _ in range(args.clients)]
        kinds = {
            "grpc": (grpc_traffic, (f"127.0.0.1:{ports['grpc']}", stop, tally)),
            "stream": (streaming_traffic, (url, stop, tally)),
            "reload": (reloader, (url, stop, tally, args.reload_every,
                                  time.monotonic() + args.warmup, server.pid, reload_samples)),
        }
        workers += [threading.Thread(target=target, args=targs)
                    for kind, (target, targs) in kinds.items() if kind not in args.skip]
        for worker in workers:
            worker.start()
        started = time.monotonic()
        time.sleep(min(args.warmup, args.minutes * 60))
        end = started + args.minutes * 60
        samples = []
        while time.monotonic() < end and server.poll() is None:
            time.sleep(min(5, max(0, end - time.monotonic())))
            if server.poll() is None:
                samples.append(rss_mib(server.pid))
                print(f"[soak] {(time.monotonic() - started) / 60:5.1f} min  RSS {samples[-1]:.1f} MiB  "
                      f"{dict(tally.counts)}", flush=True)
        alive = server.poll() is None
        # With reloads, the samples taken at the same point of each reload cycle.
        if "reload" not in args.skip and len(reload_samples) >= 5:
            samples = reload_samples
        fifth = max(1, len(samples) // 5)
        rss_start = statistics.median(samples[:fifth]) if samples else float("nan")
        rss_end = statistics.median(samples[-fifth:]) if alive and samples else float("nan")
        stop.set()
        for worker in workers:
            worker.join(timeout=REQUEST_TIMEOUT + 30)
    finally:
        stop_server(server, timeout=60)
        log.close()

    counts = tally.counts
    growth = (rss_end - rss_start) / rss_start * 100
    report = {
        "minutes": args.minutes, "sent": counts["sent"], "answered": counts["answered"],
        "good": counts["good"], "refused_as_expected": counts["refused"], "wrong": counts["wrong"],
        "lost": counts["lost"], "reloads": counts["reloads"], "server_alive": alive,
        "server_exit_code": server.returncode, "rss_mib_first_fifth": round(rss_start, 1),
        "rss_mib_last_fifth": round(rss_end, 1), "rss_growth_percent": round(growth, 2),
        "problems": tally.problems,
    }
    print(json.dumps(report, indent=2))
    failed = counts["lost"] or counts["wrong"] or not alive or not growth <= 5.0
    print("soak FAILED" if failed else "soak passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
