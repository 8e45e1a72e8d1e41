"""Model lifecycle: warm-up at load, and the memory usage the backend reports.

Warm-up: each example config has a `model_warmup` sample whose `text_input` comes from
`<model>/warmup/text_input.bin`. Triton 2.51 hands that file's bytes to the backend
unchanged as the BYTES tensor, so the file must be serialized like any BYTES tensor (per
element a 4-byte little-endian length, then the bytes); a plain-text file is refused by
the backend's BYTES validation. The proof that the warm-up ran through the backend: for a
custom backend, only the backend reports a request's success and compute times
(`TRITONBACKEND_ModelInstanceReportStatistics`), so right after a load, before any client
request, `/v2/models/<m>/stats` showing one successful execution with compute time per
instance is the backend's report of the warm-up; a model without warm-up shows none.
Bad warm-up data fails the load at model initialization (backend/src/warmup.rs says why).

Memory: `/v2/models/<m>/stats` lists `memory_usage` per memory type and device, the
model's report plus its instances'. The backend reports per instance the size of
`model.onnx` (the session's weights; with several instances, less the weights they
share, which the model reports once) and per model an estimate of its tokenizer's
vocabulary (see backend/src/memory.rs); these tests recompute all of it from the files.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tritonclient.utils import deserialize_bytes_tensor

from conftest import (
    bytes_tensor,
    MODEL_REPOSITORY,
    assert_error,
    error_message,
    load_model,
    running_server,
    text_input,
    with_instances,
    without_warmup,
)

CLASSIFIER = "sentiment-classifier"
SHIPPED = ("sentiment-classifier", "bert-base", "gpt2-small", "gpt2-small-stream")
# Versions of each shipped model (the streaming variant serves gpt2-small's version 1).
VERSIONS_OF = {model: ("1", "2") for model in SHIPPED}
VERSIONS = ("1", "2")
COLD = "classifier-without-warmup"
WARM = "classifier-with-warmup"
PLAIN_TEXT = "warmup-file-in-plain-text"
EMPTY_TEXT = "warmup-file-with-empty-text"
ZERO_DATA = "warmup-zero-data"
ONE_INSTANCE = "classifier-one-instance"
# Rust's size_of::<String>() + size_of::<u32>() on 64-bit targets (memory.rs).
VOCAB_ENTRY_OVERHEAD = 24 + 4


def read_bytes_tensor(data: bytes) -> list[bytes]:
    """A BYTES tensor's elements (tritonclient's deserializer, which refuses a truncated
    one)."""
    return list(deserialize_bytes_tensor(data))


def warmup_samples(config: str) -> list[tuple[int, str]]:
    """(element count, file name) of each text_input warm-up sample of a config.pbtxt."""
    block = config[config.index("model_warmup [") :]
    return [
        (int(dims), name)
        for dims, name in re.findall(
            r'data_type: TYPE_STRING, dims: \[ (\d+) \], input_data_file: "([^"]+)"', block
        )
    ]


def instance_count(model_dir: Path) -> int:
    """The instances the model directory's config asks for."""
    (count,) = re.findall(r"count: (\d+), kind: KIND_CPU", (model_dir / "config.pbtxt").read_text())
    return int(count)


def copy_model(repository: Path, name: str, base: str, config_edit=lambda c: c) -> Path:
    """Example model `base`, every version and its warm-up data, as `name`."""
    target = repository / name
    shutil.copytree(MODEL_REPOSITORY / base, target)
    config = (target / "config.pbtxt").read_text()
    config = config.replace(f'name: "{base}"', f'name: "{name}"')
    (target / "config.pbtxt").write_text(config_edit(config))
    return target


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory):
    """An explicit-mode server with nothing loaded: each test loads what it looks at,
    so the statistics right after a load are the warm-up's alone."""
    root = tmp_path_factory.mktemp("lifecycle")
    repository = root / "model-repository"
    for model in SHIPPED:
        shutil.copytree(MODEL_REPOSITORY / model, repository / model)
    copy_model(repository, WARM, CLASSIFIER)
    copy_model(repository, COLD, CLASSIFIER, without_warmup)
    plain = copy_model(repository, PLAIN_TEXT, CLASSIFIER)
    (plain / "warmup" / "text_input.bin").write_text("What a wonderful day!\nNot great.\n")
    empty = copy_model(repository, EMPTY_TEXT, CLASSIFIER)
    (empty / "warmup" / "text_input.bin").write_bytes(bytes_tensor(b"Fine.", b""))
    copy_model(
        repository,
        ZERO_DATA,
        CLASSIFIER,
        lambda c: c.replace('input_data_file: "text_input.bin"', "zero_data: true"),
    )
    copy_model(
        repository,
        ONE_INSTANCE,
        CLASSIFIER,
        lambda c: with_instances(c, 1),
    )
    args = ["--model-control-mode=explicit", "--strict-readiness=false"]
    with running_server(repository, root / "tritonserver.log", args) as triton:
        yield triton


def load(server, model: str) -> None:
    response = load_model(server, model)
    assert response.status_code == 200, error_message(response)


def version_stats(server, model: str) -> dict[str, dict]:
    response = server.get(f"/v2/models/{model}/stats")
    assert response.status_code == 200, response.text
    return {stats["version"]: stats for stats in response.json()["model_stats"]}


# --- Warm-up ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", SHIPPED)
def test_shipped_warmup_files_are_serialized_bytes_tensors(model):
    config = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    samples = warmup_samples(config)
    assert samples, f"{model}/config.pbtxt has no text_input warm-up sample"
    for count, name in samples:
        texts = read_bytes_tensor((MODEL_REPOSITORY / model / "warmup" / name).read_bytes())
        assert len(texts) == count, (name, texts)
        assert all(text.decode("utf-8").strip() for text in texts), texts


@pytest.mark.parametrize("model", SHIPPED)
def test_warmup_runs_through_the_backend_before_the_first_request(lifecycle_server, model):
    load(lifecycle_server, model)
    # No client request yet: what the statistics count is the warm-up, executed and
    # reported (with its compute times) by the backend, once for each instance of every
    # version.
    instances = instance_count(MODEL_REPOSITORY / model)
    for version in VERSIONS_OF[model]:
        stats = version_stats(lifecycle_server, model)[version]
        inference = stats["inference_stats"]
        assert (stats["execution_count"], stats["inference_count"]) == (instances, instances), stats
        assert inference["success"]["count"] == instances and inference["fail"]["count"] == 0, stats
        assert inference["compute_infer"]["ns"] > 0, stats
        assert stats["batch_stats"][0]["batch_size"] == 1, stats


def test_model_without_warmup_has_run_nothing(lifecycle_server):
    load(lifecycle_server, COLD)
    for version in VERSIONS:
        stats = version_stats(lifecycle_server, COLD)[version]
        assert (stats["execution_count"], stats["inference_count"]) == (0, 0), stats
        assert stats["inference_stats"]["success"]["count"] == 0, stats


@pytest.mark.parametrize(
    "model, fragment",
    [
        # Triton passes the file through unchanged: its first 4 bytes ("What") would be
        # read as a length prefix.
        (PLAIN_TEXT, "input 'text_input': BYTES element 0 declares 1952540759 bytes"),
        (EMPTY_TEXT, "input 'text_input' element 1 is empty"),
        # Triton's zero data for a BYTES input is empty strings.
        (ZERO_DATA, "input 'text_input' element 0 is empty"),
    ],
    ids=["plain-text-file", "empty-text", "zero-data"],
)
def test_bad_warmup_data_fails_the_load_cleanly(lifecycle_server, model, fragment):
    """Warm-up data the backend would refuse fails the load at model initialization, with
    the message a client request would get. (Had it reached an instance, Triton 2.51 could
    crash while tearing that instance down: see backend/src/warmup.rs.)"""
    assert_error(load_model(lifecycle_server, model), "model_warmup sample 'two_texts'", fragment)
    assert "failed to run warmup sample" not in lifecycle_server.log()
    assert lifecycle_server.get("/v2/health/live").status_code == 200


def first_and_steady_compute_ns(server, model: str, requests: int = 4) -> tuple[int, float]:
    """Server-side compute time (as the backend reports it) of the first client request
    after a load, and the median of the following ones."""
    body = {"inputs": [text_input(["What a wonderful day!", "Not great."])]}
    times = []
    for _ in range(requests):
        before = version_stats(server, model)["2"]["inference_stats"]["compute_infer"]["ns"]
        response = server.post(f"/v2/models/{model}/versions/2/infer", body)
        assert response.status_code == 200, response.text[:2000]
        # The backend reports statistics just after the response: wait for them.
        deadline = time.monotonic() + 5
        while True:
            after = version_stats(server, model)["2"]["inference_stats"]["compute_infer"]["ns"]
            if after != before or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        times.append(after - before)
    return times[0], statistics.median(times[1:])


def test_first_request_after_warmup_is_not_the_slow_one(lifecycle_server):
    """Supplementary and coarse (the proof is the statistics above). Without warm-up
    the first request used to pay for ONNX Runtime's first run (about 2.4x the following
    ones, in the median of fresh loads; 1.1x with warm-up). Every instance load now runs
    one sequence of the longest length (to check the model can serve
    max_sequence_length), which warms the session too: the first request is not the
    slow one either way."""
    ratios: dict[str, list[float]] = {COLD: [], WARM: []}
    for _ in range(3):
        for model in (COLD, WARM):
            lifecycle_server.post(f"/v2/repository/models/{model}/unload")
            load(lifecycle_server, model)
            first, steady = first_and_steady_compute_ns(lifecycle_server, model)
            ratios[model].append(first / steady)
    cold, warm = statistics.median(ratios[COLD]), statistics.median(ratios[WARM])
    print(f"\nfirst request / following ones: without warm-up {cold:.1f}x, with {warm:.1f}x")
    assert cold < 2.0 and warm < 2.0, ratios


# --- Memory usage -------------------------------------------------------------------------


def vocabulary_estimate(tokenizer_json: Path) -> int:
    """memory.rs's count: every token (added ones included) twice, as its UTF-8 bytes plus
    a String header and a u32 id."""
    tokenizer = json.loads(tokenizer_json.read_text())
    tokens = set(tokenizer["model"]["vocab"]) | {
        token["content"] for token in tokenizer.get("added_tokens", [])
    }
    return sum(2 * (len(token.encode("utf-8")) + VOCAB_ENTRY_OVERHEAD) for token in tokens)


def shared_weights(model_onnx: Path) -> int:
    """shared_weights.rs's count: the FP32 initializers of at least 1024 values stored in
    the file, which the instances of a version share."""
    model = onnx.load(model_onnx, load_external_data=False)
    return sum(
        4 * numpy_helper.to_array(t).size
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
        and t.data_location != onnx.TensorProto.EXTERNAL
        and int(np.prod(t.dims)) >= 1024
    )


def expected_usage(model_dir: Path, version: str) -> list[dict]:
    """One instance reports the whole file; with more (the config's count), the shared
    weights are counted once, for the model, and each instance reports the rest."""
    instances = instance_count(model_dir)
    weights = (model_dir / version / "model.onnx").stat().st_size
    shared = shared_weights(model_dir / version / "model.onnx") if instances > 1 else 0
    vocabulary = vocabulary_estimate(model_dir / version / "tokenizer.json")
    total = shared + instances * (weights - shared) + vocabulary
    return [{"type": "CPU", "id": 0, "byte_size": total}]


@pytest.mark.parametrize("model", SHIPPED)
def test_memory_usage_is_reported(lifecycle_server, model):
    """Each version reports its instances' weights plus its tokenizer, on the CPU: the
    encoders have two instances, which share the weights."""
    if lifecycle_server.get(f"/v2/models/{model}/ready").status_code != 200:
        load(lifecycle_server, model)
    stats = version_stats(lifecycle_server, model)
    for version in VERSIONS_OF[model]:
        assert stats[version]["memory_usage"] == expected_usage(
            MODEL_REPOSITORY / model, version
        ), stats[version]


def test_memory_usage_of_one_instance(lifecycle_server):
    """One instance holds the weights in its own session (nothing shared), and reports
    them with the tokenizer."""
    load(lifecycle_server, ONE_INSTANCE)
    model_dir = lifecycle_server.repository / ONE_INSTANCE
    stats = version_stats(lifecycle_server, ONE_INSTANCE)
    for version in VERSIONS:
        assert stats[version]["memory_usage"] == expected_usage(model_dir, version), stats[version]
    # Unloading releases it: the model has no statistics any more.
    response = lifecycle_server.post(f"/v2/repository/models/{ONE_INSTANCE}/unload")
    assert response.status_code == 200, error_message(response)
    assert lifecycle_server.get(f"/v2/models/{ONE_INSTANCE}/stats").status_code != 200
