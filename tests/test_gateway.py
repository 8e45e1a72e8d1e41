"""The HTTP gateway (docker/k8s/gateway/: nginx with triton-guard.js) in front of a real
tritonserver: what it refuses, with which status, and that everything else passes
through unchanged (JSON and binary tensors, generation streams, model loads).

Triton 2.51 dies (SIGSEGV) on a JSON body nested ~30,000 levels deep, and aborts
(std::bad_alloc) on an input whose JSON `data` is one value under a shape of 2^40; the
last tests show both on a server without the gateway, so the day a Triton upgrade fixes
them the tests say so.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from conftest import (
    REPO_ROOT,
    assert_error,
    copy_models,
    free_port,
    load_reference,
    running_server,
    text_input,
)

GATEWAY_DIR = REPO_ROOT / "docker" / "k8s" / "gateway"
SENTIMENT = load_reference("sentiment-classifier")["versions"]["2"]
SENTIMENT_PATH = "/v2/models/sentiment-classifier/versions/2/infer"
STREAM_REFERENCE = load_reference("gpt2-small")
# Far past the ~30,000 levels that exhaust an 8 MiB thread stack in Triton 2.51.
DEEP = 200_000


def deep_body(depth: int = DEEP) -> bytes:
    return (
        b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1],"data":'
        + b"[" * depth + b"]" * depth + b"}]}"
    )


class Gateway:
    """nginx running docker/k8s/gateway/nginx.conf, pointed at one tritonserver."""

    def __init__(self, triton, workdir: Path):
        self.port = free_port()
        config = (GATEWAY_DIR / "nginx.conf").read_text()
        replacements = {
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{triton.http_port};",
            "listen 8080;": f"listen 127.0.0.1:{self.port};",
            "js_path /etc/triton-gateway;": f"js_path {GATEWAY_DIR};",
            "/tmp/triton-gateway": str(workdir / "triton-gateway"),
            "error_log stderr warn;": f"error_log {workdir / 'nginx.log'} warn;",
        }
        for old, new in replacements.items():
            assert old in config, f"docker/k8s/gateway/nginx.conf no longer has {old!r}"
            config = config.replace(old, new)
        if os.geteuid() == 0:
            # As root, nginx would run its workers as nobody, who cannot read the test's
            # temporary directory.
            config = "user root;\n" + config
        path = workdir / "nginx.conf"
        path.write_text(config)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen(
            [nginx, "-c", str(path), "-p", str(workdir), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while True:
            assert self.process.poll() is None, (workdir / "nginx.log").read_text()
            try:
                requests.get(f"{self.url}/v2/health/live", timeout=2)
                return
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)

    def post(self, path: str, data=None, json_body=None, headers=None) -> requests.Response:
        return requests.post(
            self.url + path,
            data=data,
            json=json_body,
            headers={"Connection": "close", **(headers or {})},
            timeout=60,
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def triton_and_gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gateway")
    repository = copy_models(workdir / "model-repository", "sentiment-classifier", "gpt2-small-stream")
    args = ["--model-control-mode=explicit", "--load-model=*"]
    with running_server(repository, workdir / "tritonserver.log", args) as triton:
        gateway = Gateway(triton, workdir)
        try:
            yield triton, gateway
        finally:
            gateway.stop()


@pytest.fixture
def gateway(triton_and_gateway):
    triton, gateway = triton_and_gateway
    yield gateway
    assert triton.is_healthy(), triton.log()[-5000:]
    # A good request right after gets the right answer through the gateway.
    case = SENTIMENT[0]
    response = gateway.post(
        SENTIMENT_PATH, json_body={"inputs": [text_input([case["text"]])]}
    )
    assert response.status_code == 200, response.text
    labels = {o["name"]: o["data"] for o in response.json()["outputs"]}["sentiment_label"]
    assert labels == [case["label"]]


def test_deep_json_is_refused_before_it_reaches_triton(gateway):
    response = gateway.post("/v2/models/sentiment-classifier/infer", data=deep_body())
    assert_error(response, "refused by the gateway", "nesting")


def test_deep_json_in_a_binary_request_header_is_refused(gateway):
    header = deep_body()
    response = gateway.post(
        "/v2/models/sentiment-classifier/infer",
        data=header + b"\x00" * 16,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_error(response, "refused by the gateway", "nesting")


@pytest.mark.parametrize("declared", ["-1", "abc", "99999999"])
def test_a_binary_header_length_outside_the_body_is_refused(gateway, declared):
    response = gateway.post(
        "/v2/models/sentiment-classifier/infer",
        data=b"{}",
        headers={"Inference-Header-Content-Length": declared},
    )
    assert_error(response, "Inference-Header-Content-Length")


def test_deep_json_inside_a_load_config_is_refused(gateway):
    config = "[" * DEEP + "]" * DEEP
    response = gateway.post(
        "/v2/repository/models/sentiment-classifier/load",
        json_body={"parameters": {"config": config}},
    )
    assert_error(response, "refused by the gateway", "nesting")


def tensor_body(datatype: str, shape: list, data: list) -> dict:
    """An infer body with one JSON tensor `text_input`."""
    return {"inputs": [{"name": "text_input", "datatype": datatype, "shape": shape, "data": data}]}


# One value under a declared shape of 2^40: Triton 2.51 allocates the shape first.
HUGE_SHAPE_BODY = tensor_body("BOOL", [1 << 40], [True])


@pytest.mark.parametrize(
    "body, declared",
    [
        (HUGE_SHAPE_BODY, "[1099511627776], which holds 1099511627776 values, but its 'data' has 1"),
        (
            tensor_body("FP32", [1 << 20, 1 << 20], [[1.0]]),
            "[1048576,1048576], which holds 1099511627776 values, but its 'data' has 1",
        ),
        # Fewer values declared than sent: Triton would refuse it too, after parsing.
        (tensor_body("BYTES", [1], ["one", "two"]), "[1], which holds 1 value, but its 'data' has 2"),
    ],
    ids=["bool-2^40", "fp32-2^20x2^20", "bytes-short-shape"],
)
def test_data_that_does_not_fill_its_shape_is_refused(gateway, body, declared):
    response = gateway.post("/v2/models/sentiment-classifier/infer", json_body=body)
    assert_error(response, "refused by the gateway", "input 'text_input' has shape " + declared)


def test_data_nested_as_its_shape_passes_the_shape_check(gateway):
    # [2, 1] nested or flat holds 2 values: the gateway passes it and Triton answers
    # (this model takes rank-1 text, so with its own shape error).
    for data in ([["one"], ["two"]], ["one", "two"]):
        response = gateway.post(
            SENTIMENT_PATH, json_body=tensor_body("BYTES", [2, 1], data)
        )
        assert response.status_code == 400, response.text
        assert "refused by the gateway" not in response.text
        assert "text_input" in response.json()["error"], response.text


def test_malformed_json_gets_a_400_not_tritons_500(gateway):
    response = gateway.post("/v2/models/sentiment-classifier/infer", data=b'{"inputs": [')
    assert_error(response, "refused by the gateway")


def test_compressed_bodies_are_refused(gateway):
    body = gzip.compress(deep_body())  # ~1 KB that Triton would inflate to 400 KB
    response = gateway.post(
        "/v2/models/sentiment-classifier/infer", data=body, headers={"Content-Encoding": "gzip"}
    )
    assert_error(response, "Content-Encoding gzip", status=415)


def test_bodies_over_8_mib_are_refused(gateway):
    body = json.dumps({"inputs": [text_input(["x" * (9 << 20)])]}).encode()
    response = gateway.post("/v2/models/sentiment-classifier/infer", data=body)
    assert_error(response, "8 MiB", status=413)


def test_json_and_binary_tensors_pass_through(gateway):
    texts = [case["text"] for case in SENTIMENT]
    expected = [case["label"] for case in SENTIMENT]
    response = gateway.post(
        SENTIMENT_PATH, json_body={"inputs": [text_input(texts)]}
    )
    assert response.status_code == 200, response.text
    labels = {o["name"]: o["data"] for o in response.json()["outputs"]}["sentiment_label"]
    assert labels == expected

    client = httpclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
    try:
        tensor = httpclient.InferInput("text_input", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=True)
        result = client.infer(
            "sentiment-classifier",
            [tensor],
            model_version="2",
            outputs=[httpclient.InferRequestedOutput("sentiment_label", binary_data=True)],
        )
        assert [label.decode() for label in result.as_numpy("sentiment_label")] == expected
    finally:
        client.close()


def test_generation_streams_pass_through_as_events(gateway):
    case = STREAM_REFERENCE["versions"]["1"][0]
    body = {
        "text_input": case["prompt"],
        "parameters": {"do_sample": False, "max_new_tokens": STREAM_REFERENCE["max_new_tokens"]},
    }
    response = gateway.post("/v2/models/gpt2-small-stream/versions/1/generate_stream", json_body=body)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    assert len(events) > 1, events
    assert "".join(e["text_output"] for e in events) == case["new_text"]


def test_model_loads_pass_through(gateway):
    response = gateway.post("/v2/repository/models/sentiment-classifier/load")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "body, signal, fixed",
    [
        (
            deep_body(),
            -11,  # SIGSEGV: the HTTP thread's stack is exhausted
            "a JSON body nested 200,000 levels deep: this Triton parses JSON without "
            "recursion, and the gateway's depth limit",
        ),
        (
            json.dumps(HUGE_SHAPE_BODY).encode(),
            -6,  # SIGABRT: std::bad_alloc
            "one JSON value under a declared shape of 2^40: this Triton checks the shape "
            "before it allocates, and the gateway's shape check",
        ),
    ],
    ids=["deep-json", "huge-declared-shape"],
)
def test_without_the_gateway_the_body_kills_triton_2_51(start_server, tmp_path, body, signal, fixed):
    triton = start_server(copy_models(tmp_path / "repository", "sentiment-classifier"))
    try:
        requests.post(
            f"{triton.http_url}/v2/models/sentiment-classifier/infer", data=body, timeout=30
        )
    except requests.ConnectionError:
        pass
    try:
        triton.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"tritonserver survived {fixed} is no longer what keeps it alive (update the "
            "README's troubleshooting entry)"
        )
    assert triton.process.returncode == signal, triton.process.returncode
