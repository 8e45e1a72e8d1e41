"""Fixtures that run a real tritonserver with libtriton_rust.so.

Paths come from the environment that scripts/common.sh exports (scripts/test.sh does
this): TRITONSERVER_BIN, TRITON_RUST_BACKEND_DIR (<dir>/rust/libtriton_rust.so with
libonnxruntime beside it) and TRITON_RUST_ORT_LIBRARY.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model-repository"
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run the tests with scripts/test.sh", returncode=2)
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One tritonserver process on loopback with free ports and its own log file."""

    def __init__(self, repository: Path, log_path: Path, args=(), env=None, backend_dir=None):
        self.repository = Path(repository)
        self.log_path = log_path
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.backend_dir = backend_dir or _required_env("TRITON_RUST_BACKEND_DIR")
        command = [
            _required_env("TRITONSERVER_BIN"),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backend_dir}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--log-verbose=0",
            *args,
        ]
        full_env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
        full_env.update(env or {})
        self._log_file = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env
        )

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def wait_until(self, endpoint: str = "/v2/health/ready", timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {self.process.returncode}:\n{self.log()[-5000:]}"
                )
            try:
                if requests.get(self.http_url + endpoint, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout}s:\n{self.log()[-5000:]}")

    def post(self, path: str, body=None, **kwargs) -> requests.Response:
        return requests.post(self.http_url + path, json=body, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.http_url + path, timeout=60, **kwargs)

    def is_healthy(self) -> bool:
        return (
            self.process.poll() is None
            and self.get("/v2/health/live").status_code == 200
            and self.get("/v2/health/ready").status_code == 200
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A server with the example repository, every model and version loaded."""
    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    triton = TritonServer(MODEL_REPOSITORY, log)
    try:
        triton.wait_until()
        yield triton
    finally:
        triton.stop()
        assert "panic" not in triton.log().lower(), triton.log()[-5000:]


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(repository, args=[...], env={...}, ready_endpoint=...)."""
    started = []

    def start(repository, args=(), env=None, backend_dir=None, ready_endpoint="/v2/health/ready"):
        triton = TritonServer(
            repository, tmp_path / f"tritonserver-{len(started)}.log", args, env, backend_dir
        )
        started.append(triton)
        triton.wait_until(ready_endpoint)
        return triton

    yield start
    for triton in started:
        triton.stop()


@pytest.fixture
def repository_copy(tmp_path):
    """Factory: a copy of the example repository (or some of its models) to modify."""

    def copy(*models: str) -> Path:
        target = tmp_path / "model-repository"
        for model in models or [p.name for p in MODEL_REPOSITORY.iterdir() if p.is_dir()]:
            shutil.copytree(MODEL_REPOSITORY / model, target / model)
        return target

    return copy


def load_reference(model: str) -> dict:
    return json.loads((REFERENCE_DIR / f"{model}.json").read_text())
