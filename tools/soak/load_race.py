"""Load/unload race: one model loaded and unloaded in a loop (explicit model control)
while client threads send it requests, for N minutes, against a real tritonserver with
core dumps on. A server that dies is restarted and the run goes on, so one run counts
every crash; each crash leaves its core file and a gdb backtrace of every thread.

`--backend rust` cycles the example sentiment-classifier on libtriton_rust.so; two
controls without any of our code cycle an identity model: `--backend python` on Triton's
own Python backend (from the same tritonserver wheel), `--backend identity` on the
trivial C++ backend in identity_backend/ (built here with c++), whose instances can
keep a core busy for `--init-us` microseconds while they start, as creating an ONNX
Runtime session does.

Run through scripts/load-race.sh (it sets up the environment):
    scripts/load-race.sh 30 --backend rust
    scripts/load-race.sh 30 --backend python
    scripts/load-race.sh 12 --backend identity --init-us 300000
Exit status 1 when the server crashed at least once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import REPO_ROOT, free_port, stop_server, wait_ready  # noqa: E402

TRITON_DIR = REPO_ROOT / ".deps" / "pytriton" / "pytriton" / "tritonserver"
STUB_PYTHON = "3.11"  # the stub embeds Debian 12's libpython3.11

IDENTITY_CONFIG = """name: "identity"
backend: "python"
max_batch_size: 0
version_policy: { all { } }
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

IDENTITY_WARMUP = """model_warmup [ {
  name: "zeros"
  batch_size: 1
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
} ]
"""

IDENTITY_MODEL = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", data)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''


def python_setup(workdir: Path, warmup: bool) -> tuple[Path, Path, str, dict, list]:
    """A repository with the identity model and a backend directory holding Triton's
    Python backend (its stub reached through a link, as it finds its libraries through
    $ORIGIN)."""
    if subprocess.run(["/usr/bin/python3", "-c", "import numpy"], capture_output=True).returncode != 0:
        sys.exit("the Python backend's stub needs numpy < 2 for Debian's python3: apt-get install python3-numpy")
    repository = workdir / "repository"
    (repository / "identity").mkdir(parents=True)
    (repository / "identity" / "config.pbtxt").write_text(
        IDENTITY_CONFIG + (IDENTITY_WARMUP if warmup else ""))
    # Two versions, both served, like the example sentiment-classifier.
    for version in ("1", "2"):
        (repository / "identity" / version).mkdir()
        (repository / "identity" / version / "model.py").write_text(IDENTITY_MODEL)
    backends = workdir / "backends" / "python"
    backends.mkdir(parents=True)
    source = TRITON_DIR / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backends / name).symlink_to(source / name)
    stub = TRITON_DIR / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub"
    (backends / "triton_python_backend_stub").symlink_to(stub)
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}
    return repository, workdir / "backends", "identity", body, [1, 2, 3, 4]


def identity_setup(workdir: Path, warmup: bool) -> tuple[Path, Path, str, dict, list]:
    """The identity model on identity_backend/identity.cc, compiled against the Triton
    headers triton-sys builds with."""
    backends = workdir / "backends" / "identity"
    backends.mkdir(parents=True)
    include = REPO_ROOT / "triton-sys" / "third_party" / "triton-core-r24.10" / "include"
    subprocess.run(["c++", "-shared", "-fPIC", "-O2", f"-I{include}",
                    str(Path(__file__).resolve().parent / "identity_backend" / "identity.cc"),
                    "-o", str(backends / "libtriton_identity.so")], check=True)
    repository = workdir / "repository"
    (repository / "identity").mkdir(parents=True)
    config = IDENTITY_CONFIG.replace('backend: "python"', 'backend: "identity"')
    (repository / "identity" / "config.pbtxt").write_text(config + (IDENTITY_WARMUP if warmup else ""))
    for version in ("1", "2"):
        (repository / "identity" / version).mkdir()
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}
    return repository, workdir / "backends", "identity", body, [1, 2, 3, 4]


def rust_setup(workdir: Path, warmup: bool) -> tuple[Path, Path, str, dict, list]:
    repository = workdir / "repository"
    shutil.copytree(REPO_ROOT / "model-repository" / "sentiment-classifier",
                    repository / "sentiment-classifier")
    if not warmup:
        config_path = repository / "sentiment-classifier" / "config.pbtxt"
        config = config_path.read_text()
        start = config.index("model_warmup [")
        config_path.write_text(config[:start] + config[config.index("\n]\n", start) + 3:])
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2],
                        "data": ["A fine day.", "A bad day."]}],
            "outputs": [{"name": "sentiment_label"}]}
    return repository, Path(os.environ["TRITON_RUST_BACKEND_DIR"]), "sentiment-classifier", body, None


class Server:
    def __init__(self, repository: Path, backends: Path, workdir: Path, index: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = workdir / f"server-{index}"  # where the kernel writes a core file
        self.cwd.mkdir()
        self.log = open(self.cwd / "tritonserver.log", "wb")
        self.process = subprocess.Popen(
            [os.environ["TRITONSERVER_BIN"], f"--model-repository={repository}",
             f"--backend-directory={backends}", "--model-control-mode=explicit",
             "--load-model=*", "--http-address=127.0.0.1", f"--http-port={self.port}",
             "--allow-grpc=false", "--allow-metrics=false", "--exit-timeout-secs=5"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.cwd,
            env=dict(os.environ, ORT_DISABLE_TELEMETRY="1"),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE,
                                                  (resource.RLIM_INFINITY, resource.RLIM_INFINITY)),
        )
        if not wait_ready(self.url, self.process):
            sys.exit(f"tritonserver did not start: {(self.cwd / 'tritonserver.log').read_text()[-3000:]}")

    def stop(self) -> None:
        stop_server(self.process, timeout=30)
        self.log.close()

    def fatal_signal(self) -> str | None:
        """The fatal-signal report in the server's log, if any: glibc's heap-corruption
        message and Triton's "Signal (6) received." (Triton's handler then shuts the
        server down, which can hang instead of exiting)."""
        self.log.flush()
        text = (self.cwd / "tritonserver.log").read_text(errors="replace")
        lines = [line for line in text.splitlines()
                 if line.startswith("Signal (") or "corrupt" in line or line.startswith(("malloc", "free()"))]
        return "; ".join(lines[:3]) if lines else None


def backtrace(server: Server) -> str:
    cores = sorted(server.cwd.glob("core*"))
    if not cores:
        return (f"no core file in {server.cwd} (kernel.core_pattern is "
                f"{Path('/proc/sys/kernel/core_pattern').read_text().strip()!r})")
    if not shutil.which("gdb"):
        return f"core file {cores[0]} (install gdb for a backtrace)"
    result = subprocess.run(
        ["gdb", "-batch", "-ex", "bt 30", "-ex", "thread apply all bt 12",
         os.environ["TRITONSERVER_BIN"], str(cores[0])],
        capture_output=True, text=True, timeout=300)
    (server.cwd / "backtrace.txt").write_text(result.stdout + result.stderr)
    return f"core file {cores[0]}, backtrace in {server.cwd / 'backtrace.txt'}"


def live_backtrace(server: Server) -> str:
    if not shutil.which("gdb"):
        return "install gdb for a backtrace"
    result = subprocess.run(
        ["gdb", "-batch", "-p", str(server.process.pid), "-ex", "thread apply all bt 20"],
        capture_output=True, text=True, timeout=300)
    (server.cwd / "backtrace.txt").write_text(result.stdout + result.stderr)
    return f"backtrace of the live server in {server.cwd / 'backtrace.txt'}"


def wait_unloaded(url: str, model: str, timeout: float = 60) -> None:
    """Waits until no version of `model` is left in the repository index but unloaded
    ones: an unload answers at once and finishes in the background."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = requests.post(f"{url}/v2/repository/index", json={}, timeout=10).json()
        states = [entry.get("state") for entry in index if entry["name"] == model]
        if all(state == "UNAVAILABLE" for state in states):
            return
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", type=float)
    parser.add_argument("--backend", choices=["rust", "python", "identity"], required=True)
    parser.add_argument("--init-us", type=int, default=0,
                        help="identity backend: microseconds of CPU an instance takes to initialize")
    parser.add_argument("--trim-on-finalize", action="store_true",
                        help="identity backend: malloc_trim(0) when a model is finalized")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="give the model a model_warmup sample (default: yes)")
    parser.add_argument("--wait-unloaded", action="store_true",
                        help="wait for each unload to finish before the next load")
    parser.add_argument("--workdir", default=None, help="where logs and core files go")
    args = parser.parse_args()

    workdir = Path(args.workdir or f"load-race-{args.backend}-{int(time.time())}").resolve()
    workdir.mkdir(parents=True)
    setup = {"rust": rust_setup, "python": python_setup, "identity": identity_setup}[args.backend]
    os.environ["IDENTITY_INIT_US"] = str(args.init_us)
    os.environ["IDENTITY_TRIM_ON_FINALIZE"] = "1" if args.trim_on_finalize else "0"
    repository, backends, model, body, expected = setup(workdir, args.warmup)

    counts: Counter = Counter()
    lock = threading.Lock()
    crashes: list[str] = []
    server = Server(repository, backends, workdir, 0)
    alive = threading.Event()
    alive.set()
    stop = threading.Event()

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            alive.wait()
            url = server.url
            try:
                response = session.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
            except requests.RequestException:
                count("connection errors")
                session = requests.Session()
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                outputs = response.json()["outputs"]
                if expected is not None and outputs[0]["data"] != expected:
                    count("wrong answers")
                else:
                    count("answered 200")
            elif "unavailable" in response.text.lower() or "not found" in response.text.lower() \
                    or "unknown model" in response.text.lower():
                count("refused while unloaded")
            else:
                count(f"other {response.status_code}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.minutes * 60
    next_report = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            for action in ("unload", "load"):
                requests.post(f"{server.url}/v2/repository/models/{model}/{action}", timeout=120)
                count(f"{action}s")
                if action == "unload" and args.wait_unloaded:
                    wait_unloaded(server.url, model)
        except requests.RequestException:
            pass
        signal_report = server.fatal_signal()
        if server.process.poll() is not None or signal_report:
            alive.clear()
            if server.process.poll() is None:
                # Caught by Triton's handler: a backtrace of every live thread, then a kill.
                trace = live_backtrace(server)
                server.process.kill()
                server.process.wait()
                crashes.append(f"{signal_report} after {counts['loads']} loads: {trace}")
            else:
                code = server.process.returncode
                what = signal_report or f"exit {code}"
                crashes.append(f"{what} after {counts['loads']} loads: {backtrace(server)}")
            print(f"CRASH {crashes[-1]}", flush=True)
            server.stop()
            server = Server(repository, backends, workdir, len(crashes))
            alive.set()
        if time.monotonic() > next_report:
            next_report += 60
            print(f"{time.strftime('%H:%M:%S')} {dict(counts)}", flush=True)
    stop.set()
    for thread in threads:
        thread.join(timeout=70)
    server.stop()

    report = {"backend": args.backend, "init_us": args.init_us,
              "trim_on_finalize": args.trim_on_finalize,
              "warmup": args.warmup,
              "wait_unloaded": args.wait_unloaded, "minutes": args.minutes,
              "clients": args.clients,
              "counts": dict(counts), "crashes": crashes, "workdir": str(workdir)}
    print(json.dumps(report, indent=2))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
