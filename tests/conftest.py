"""Fixtures that run a real tritonserver with libtriton_rust.so.

Paths come from the environment that scripts/common.sh exports (scripts/test.sh does
this): TRITONSERVER_BIN, TRITON_RUST_BACKEND_DIR (<dir>/rust/libtriton_rust.so with
libonnxruntime beside it) and TRITON_RUST_ORT_LIBRARY.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from tritonclient.utils import serialize_byte_tensor

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

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        args=(),
        env=None,
        backend_dir=None,
        command=None,
        cwd=None,
    ):
        """`command`: the tritonserver argv up to the listening options (default: the
        binary with `repository` and `backend_dir`); `cwd`: where it runs."""
        self.repository = Path(repository)
        self.log_path = log_path
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.backend_dir = backend_dir or _required_env("TRITON_RUST_BACKEND_DIR")
        command = [
            *(
                command
                or [
                    _required_env("TRITONSERVER_BIN"),
                    f"--model-repository={self.repository}",
                    f"--backend-directory={self.backend_dir}",
                ]
            ),
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
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
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

    # Every call closes its connection: a requests.Response that is still referenced
    # (a local in a traceback, a global) otherwise keeps its keep-alive connection open,
    # and tritonserver then waits its whole exit timeout (30 s) for it on SIGTERM.
    def post(self, path: str, body=None, **kwargs) -> requests.Response:
        headers = {"Connection": "close", **kwargs.pop("headers", {})}
        return requests.post(
            self.http_url + path, json=body, timeout=60, headers=headers, **kwargs
        )

    def get(self, path: str, **kwargs) -> requests.Response:
        headers = {"Connection": "close", **kwargs.pop("headers", {})}
        return requests.get(self.http_url + path, timeout=60, headers=headers, **kwargs)

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


@contextlib.contextmanager
def running_server(repository, log_path: Path, args=(), env=None, **options):
    """A ready server for the duration of a with-block; its log must show no panic.
    `options` go to TritonServer (`command`, `cwd`, `backend_dir`)."""
    triton = TritonServer(repository, log_path, args, env, **options)
    try:
        triton.wait_until()
        yield triton
    finally:
        triton.stop()
        assert "panic" not in triton.log().lower(), triton.log()[-5000:]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A server with the example repository, every model and version loaded."""
    with running_server(MODEL_REPOSITORY, tmp_path_factory.mktemp("server") / "tritonserver.log") as triton:
        yield triton


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


def copy_models(target: Path, *models: str) -> Path:
    """Copies models of the example repository (all of them by default) into `target`."""
    for model in models or [p.name for p in MODEL_REPOSITORY.iterdir() if p.is_dir()]:
        shutil.copytree(MODEL_REPOSITORY / model, target / model)
    return target


@pytest.fixture
def repository_copy(tmp_path):
    """Factory: a copy of the example repository (or some of its models) to modify."""
    return lambda *models: copy_models(tmp_path / "model-repository", *models)


def without_warmup(config: str) -> str:
    """A config.pbtxt text without its `model_warmup` block and the comment above it."""
    start = config.index("model_warmup [")
    end = config.index("\n]\n", start) + len("\n]\n")
    before = config[:start].rstrip("\n").split("\n")
    while before and (before[-1].startswith("#") or not before[-1].strip()):
        before.pop()
    return "\n".join(before) + "\n" + config[end:]


def with_instances(config: str, count: int) -> str:
    """A config.pbtxt text with its one CPU instance group set to `count` instances."""
    config, replaced = re.subn(r"count: \d+, kind: KIND_CPU", f"count: {count}, kind: KIND_CPU", config)
    assert replaced == 1, config
    return config


def load_reference(model: str) -> dict:
    return json.loads((REFERENCE_DIR / f"{model}.json").read_text())


# --- HTTP helpers shared by the suites (plain functions, no server state) ---


def bytes_tensor(*elements: bytes) -> bytes:
    """Elements serialized as Triton's BYTES tensor (tritonclient's own serializer: a
    4-byte little-endian length, then the bytes, per element)."""
    if not elements:
        return b""
    return serialize_byte_tensor(np.array(elements, dtype=object)).item()


def text_input(texts, name: str = "text_input", shape=None) -> dict:
    """A BYTES input in the JSON request form."""
    texts = list(texts)
    shape = [len(texts)] if shape is None else list(shape)
    return {"name": name, "datatype": "BYTES", "shape": shape, "data": texts}


def int64_input(name: str, rows) -> dict:
    """An INT64 [N, S] input in the JSON request form."""
    rows = [list(row) for row in rows]
    shape = [len(rows), len(rows[0]) if rows else 0]
    return {"name": name, "datatype": "INT64", "shape": shape, "data": [v for r in rows for v in r]}


def metric_sum(triton, name: str, **labels: str) -> float:
    """The sum of the samples of metric `name` on the server's metrics port whose labels
    include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(triton.metrics_url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


CANARY_STATES = ("progressing", "promoted", "rolled_back")


def canary_state(triton, router: str) -> dict[str, float]:
    """`triton_rust_ab_canary_state` of `router`: 1 for its current state, else 0."""
    return {state: metric_sum(triton, "triton_rust_ab_canary_state", router=router, state=state)
            for state in CANARY_STATES}


def infer(server, model: str, inputs, outputs=None) -> requests.Response:
    """POST /v2/models/<model>/infer with a JSON body (all outputs unless named)."""
    body = {"inputs": list(inputs)}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return server.post(f"/v2/models/{model}/infer", body)


def outputs_by_name(response: requests.Response) -> dict:
    return {output["name"]: output for output in response.json()["outputs"]}


def assert_greedy_reference(server, model: str, version: str) -> None:
    """`model` (a `text-generation` model answering in one response) generates, for each
    reference prompt of `version`, the prompt plus the reference's greedy new text."""
    reference = load_reference("gpt2-small")
    for case in reference["versions"][version]:
        body = {
            "inputs": [text_input([case["prompt"]])],
            "parameters": {"do_sample": False, "max_new_tokens": reference["max_new_tokens"]},
        }
        response = server.post(f"/v2/models/{model}/versions/{version}/infer", body)
        assert response.status_code == 200, response.text
        assert outputs_by_name(response)["generated_text"]["data"] == [
            case["prompt"] + case["new_text"]
        ]


def error_message(response: requests.Response) -> str:
    """The `error` field of a KServe error body ('' if there is none)."""
    try:
        return str(response.json().get("error", ""))
    except ValueError:
        return response.text


def assert_error(response: requests.Response, *fragments: str, status: int = 400) -> str:
    """Asserts the HTTP status and that the error message contains every fragment."""
    message = error_message(response)
    assert response.status_code == status, (response.status_code, response.text[:2000])
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in error: {message}"
    return message


# A request that must succeed, per model of the example repository, and the output
# shapes it must get back.
GOOD_REQUESTS = {
    "sentiment-classifier": (
        [text_input(["What a wonderful day!"])],
        {"sentiment_score": [1, 3], "sentiment_label": [1]},
    ),
    "bert-base": (
        [text_input(["The quick brown fox."])],
        {"embedding": [1, 64]},
    ),
}


def assert_serves(server, model: str, like: str | None = None) -> None:
    """`model` (a copy of example model `like`, by default itself) answers a good request."""
    inputs, shapes = GOOD_REQUESTS[like or model]
    response = infer(server, model, inputs)
    assert response.status_code == 200, (model, response.status_code, response.text[:2000])
    outputs = outputs_by_name(response)
    for name, shape in shapes.items():
        assert outputs[name]["shape"] == shape, (model, name, outputs[name]["shape"])


def load_model(server, model: str, config: dict | None = None) -> requests.Response:
    """Explicit-mode load; `config` (a model config dict) overrides config.pbtxt."""
    body = {"parameters": {"config": json.dumps(config)}} if config is not None else None
    return server.post(f"/v2/repository/models/{model}/load", body)


def repository_index(server) -> dict:
    """POST /v2/repository/index as {name: [entries, one per version]}."""
    response = server.post("/v2/repository/index")
    assert response.status_code == 200, response.text
    index: dict = {}
    for entry in response.json():
        index.setdefault(entry["name"], []).append(entry)
    return index


def classifier_config(name: str, **parameters: str) -> dict:
    """The example classifier's configuration as JSON, with the given parameters."""
    return {
        "name": name,
        "backend": "rust",
        "max_batch_size": 0,
        "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [
            {"name": "sentiment_score", "data_type": "TYPE_FP32", "dims": [-1, 3]},
            {"name": "sentiment_label", "data_type": "TYPE_STRING", "dims": [-1]},
        ],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }
