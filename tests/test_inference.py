"""Correct inference through a real tritonserver loading libtriton_rust.so.

Every expected number comes from tests/reference/*.json, computed per text by Hugging
Face transformers (an implementation independent of the backend). Each result is
checked over the three client protocols: KServe JSON over HTTP, the HTTP binary tensor
extension (tritonclient.http) and gRPC (tritonclient.grpc).

Most tests use the session `server` (the example repository, both models, both
versions); the dynamic-batching tests start their own server on a modified copy.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from clients import Clients, from_json_tensor, infer_path, json_tensor
from conftest import MODEL_REPOSITORY, load_reference

CLASSIFIER = "sentiment-classifier"
ENCODER = "bert-base"
MODELS = (CLASSIFIER, ENCODER)
VERSIONS = ("1", "2")
PROTOCOLS = ("json", "binary", "grpc")
ATOL = 1e-4

REFERENCE = {model: load_reference(model) for model in MODELS}
HIDDEN = REFERENCE[ENCODER]["hidden_size"]
OUTPUTS = {
    CLASSIFIER: ("sentiment_score", "sentiment_label"),
    ENCODER: ("last_hidden_state", "embedding"),
}


def cases(model: str, version: str) -> list[dict]:
    """The reference entries (one per text) of one model version."""
    return REFERENCE[model]["versions"][version]


def latest_version(model: str) -> str:
    return max(REFERENCE[model]["versions"], key=int)


def texts_of(refs: list[dict]) -> np.ndarray:
    return np.array([ref["text"] for ref in refs], dtype=object)


def text_inputs(refs: list[dict]) -> dict[str, np.ndarray]:
    return {"text_input": texts_of(refs)}


def id_inputs(refs: list[dict]) -> dict[str, np.ndarray]:
    """Reference token ids and masks, right-padded by the client with the pad id and mask 0."""
    longest = max(len(ref["input_ids"]) for ref in refs)
    pad = REFERENCE[ENCODER]["pad_token_id"]
    ids = np.full((len(refs), longest), pad, dtype=np.int64)
    mask = np.zeros((len(refs), longest), dtype=np.int64)
    for row, ref in enumerate(refs):
        ids[row, : len(ref["input_ids"])] = ref["input_ids"]
        mask[row, : len(ref["attention_mask"])] = ref["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def clients(server):
    c = Clients(server, OUTPUTS)
    yield c
    c.close()


# --- checks against the reference ---


def assert_close(actual, expected, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=0,
        atol=ATOL,
        err_msg=what,
    )


def assert_matches(model: str, outputs: dict[str, np.ndarray], refs: list[dict]) -> None:
    """Checks every output present against the references of the request's texts."""
    count = len(refs)
    texts = [ref["text"][:40] for ref in refs]
    if "sentiment_score" in outputs:
        scores = outputs["sentiment_score"]
        labels = len(REFERENCE[CLASSIFIER]["labels"])
        assert scores.shape == (count, labels), scores.shape
        assert_close(scores, [ref["probabilities"] for ref in refs], f"scores of {texts}")
    if "sentiment_label" in outputs:
        labels = outputs["sentiment_label"]
        assert labels.shape == (count,), labels.shape
        assert list(labels) == [ref["label"] for ref in refs], texts
    if "last_hidden_state" in outputs:
        hidden = outputs["last_hidden_state"]
        longest = max(len(ref["input_ids"]) for ref in refs)
        assert hidden.shape == (count, longest, HIDDEN), hidden.shape
        for row, ref in zip(hidden, refs):
            tokens = len(ref["input_ids"])
            assert_close(row[:tokens], ref["last_hidden_state"], f"hidden of {ref['text'][:40]}")
    if "embedding" in outputs:
        embedding = outputs["embedding"]
        assert embedding.shape == (count, HIDDEN), embedding.shape
        assert_close(embedding, [ref["embedding"] for ref in refs], f"embedding of {texts}")


def test_reference_covers_truncation():
    """The references include a text at the 128-token limit and short ones (sanity)."""
    for model in MODELS:
        limit = REFERENCE[model]["max_sequence_length"]
        for version in VERSIONS:
            lengths = [len(ref["input_ids"]) for ref in cases(model, version)]
            assert max(lengths) == limit and min(lengths) < limit, (model, version, lengths)


# --- 1. the seed's payload ---


def test_seed_payload_answers_with_latest_version(server):
    body = {
        "inputs": [
            {
                "name": "text_input",
                "shape": [1],
                "datatype": "BYTES",
                "data": ["This is a great day!"],
            }
        ]
    }
    response = server.post(f"/v2/models/{CLASSIFIER}/infer", body)
    assert response.status_code == 200, response.text
    latest = latest_version(CLASSIFIER)
    assert response.json()["model_version"] == latest
    outputs = {o["name"]: from_json_tensor(o) for o in response.json()["outputs"]}
    assert set(outputs) == set(OUTPUTS[CLASSIFIER])
    (ref,) = [r for r in cases(CLASSIFIER, latest) if r["text"] == "This is a great day!"]
    assert_matches(CLASSIFIER, outputs, [ref])


# --- 2. every reference text, one per request, over every protocol ---


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("model", MODELS)
def test_each_text_matches_reference(clients, model, version, protocol):
    for ref in cases(model, version):
        outputs = clients.infer(protocol, model, version, text_inputs([ref]))
        assert set(outputs) == set(OUTPUTS[model])
        assert_matches(model, outputs, [ref])


# --- 3. many texts in one request ---


@pytest.mark.parametrize("selection", ["all", "short"])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("model", MODELS)
def test_texts_batched_in_one_request(clients, model, version, selection):
    """Padding within a request is harmless; bert's last_hidden_state spans exactly the
    request's longest text (`short` leaves out the 128-token one, so padding to the
    tokenizer's or the model's maximum would show)."""
    refs = cases(model, version)
    if selection == "short":
        limit = REFERENCE[model]["max_sequence_length"]
        refs = [ref for ref in refs if len(ref["input_ids"]) < limit]
    outputs = clients.infer("json", model, version, text_inputs(refs))
    assert set(outputs) == set(OUTPUTS[model])
    assert_matches(model, outputs, refs)


# --- 4. bert-base with token ids instead of text ---


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("form", ["single", "padded"])
@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_token_id_input(clients, version, form, protocol):
    refs = cases(ENCODER, version)
    refs = refs[:1] if form == "single" else refs
    outputs = clients.infer(protocol, ENCODER, version, id_inputs(refs))
    assert set(outputs) == set(OUTPUTS[ENCODER])
    assert_matches(ENCODER, outputs, refs)


# --- 5. the two versions are different models ---


@pytest.mark.parametrize("model", MODELS)
def test_versions_differ(clients, model):
    ref = cases(model, "1")[0]
    results = [clients.infer("json", model, v, text_inputs([ref])) for v in VERSIONS]
    for name in OUTPUTS[model]:
        first, second = (result[name] for result in results)
        if first.dtype == object:
            continue  # labels may agree by chance
        assert first.shape == second.shape
        difference = np.max(np.abs(first - second))
        assert difference > 1e-3, f"{name}: versions 1 and 2 answer alike ({difference})"


# --- 6. only the requested outputs ---


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "model,output", [(model, output) for model in MODELS for output in OUTPUTS[model]]
)
def test_requested_output_subset(clients, model, output, protocol):
    refs = cases(model, "2")[:3]
    outputs = clients.infer(protocol, model, "2", text_inputs(refs), outputs=[output])
    assert list(outputs) == [output]
    assert_matches(model, outputs, refs)


# --- 7. statistics and metrics ---


def model_stats(server, model: str, version: str) -> dict:
    response = server.get(f"/v2/models/{model}/versions/{version}/stats")
    assert response.status_code == 200, response.text
    (stats,) = response.json()["model_stats"]
    assert (stats["name"], stats["version"]) == (model, version)
    return stats


def successes(stats: dict) -> int:
    return stats["inference_stats"]["success"]["count"]


def settled_stats(server, model: str, version: str, expected_successes: int) -> dict:
    """The statistics once `expected_successes` requests are counted: a backend reports a
    request's statistics just after sending its response, so they may lag a moment."""
    deadline = time.monotonic() + 5
    while True:
        stats = model_stats(server, model, version)
        if successes(stats) >= expected_successes or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def metric(server, name: str, model: str, version: str) -> float:
    text = requests.get(server.metrics_url, timeout=10).text
    pattern = rf'^{name}\{{[^}}]*model="{re.escape(model)}",version="{version}"[^}}]*\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no {name} for {model} version {version} in /metrics"
    return float(match.group(1))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("model", MODELS)
def test_statistics_and_metrics(clients, server, model, version):
    """Without batching (max_batch_size 0) every request is one inference and one
    execution, however many texts it holds."""
    before = model_stats(server, model, version)
    metric_before = metric(server, "nv_inference_request_success", model, version)
    refs = cases(model, version)
    for count in (1, 2, 3):
        clients.infer("json", model, version, text_inputs(refs[:count]))
    after = settled_stats(server, model, version, successes(before) + 3)
    assert successes(after) - successes(before) == 3
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 3
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"]
    assert metric(server, "nv_inference_request_success", model, version) == metric_before + 3


# --- 8. health and metadata ---

# What the example config.pbtxt files declare.
METADATA = {
    CLASSIFIER: {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "sentiment_score", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "sentiment_label", "datatype": "BYTES", "shape": [-1]},
        ],
    },
    ENCODER: {
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [-1]},
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [
            {"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, HIDDEN]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, HIDDEN]},
        ],
    },
}


def test_server_health(server):
    assert server.get("/v2/health/live").status_code == 200
    assert server.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("model", MODELS)
def test_model_ready_and_metadata(server, model):
    for version in VERSIONS:
        assert server.get(f"/v2/models/{model}/versions/{version}/ready").status_code == 200
        response = server.get(f"/v2/models/{model}/versions/{version}")
        assert response.status_code == 200, response.text
        metadata = response.json()
        assert metadata["name"] == model
        assert metadata["inputs"] == METADATA[model]["inputs"]
        assert metadata["outputs"] == METADATA[model]["outputs"]
    assert server.get(f"/v2/models/{model}/ready").status_code == 200
    metadata = server.get(f"/v2/models/{model}").json()
    assert sorted(metadata["versions"], key=int) == list(VERSIONS)


# --- 9. dynamic batching ---

BATCHED_IO = {
    CLASSIFIER: """
input [ { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [
  { name: "sentiment_score", data_type: TYPE_FP32, dims: [ 3 ] },
  { name: "sentiment_label", data_type: TYPE_STRING, dims: [ 1 ] }
]
""",
    ENCODER: f"""
input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ], optional: true }},
  {{ name: "attention_mask", data_type: TYPE_INT64, dims: [ -1 ], optional: true }}
]
output [
  {{ name: "last_hidden_state", data_type: TYPE_FP32, dims: [ -1, {HIDDEN} ] }},
  {{ name: "embedding", data_type: TYPE_FP32, dims: [ {HIDDEN} ] }}
]
""",
}
MAX_BATCH_SIZE = 8


def batched_config(model: str) -> str:
    """The example config with max_batch_size 8, per-item dims and a dynamic batcher;
    the `parameters` lines are copied from the original."""
    original = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    parameters = [line for line in original.splitlines() if line.startswith("parameters")]
    assert parameters, "the example config has no parameters to copy"
    return "\n".join(
        [
            f'name: "{model}"',
            'backend: "rust"',
            f"max_batch_size: {MAX_BATCH_SIZE}",
            "version_policy: { all { } }",
            BATCHED_IO[model],
            "instance_group [ { count: 1, kind: KIND_CPU } ]",
            "dynamic_batching { max_queue_delay_microseconds: 100000 }",
            *parameters,
            "",
        ]
    )


def concurrent_requests(server, model: str, version: str, refs: list[dict], requests_count=16):
    """Fires requests of 1 and 2 texts ([B, 1]) at once; returns (refs, outputs) pairs."""
    batches = [
        [refs[(2 * i + j) % len(refs)] for j in range(1 + i % 2)] for i in range(requests_count)
    ]
    barrier = threading.Barrier(len(batches))

    def send(batch):
        body = {"inputs": [json_tensor("text_input", texts_of(batch).reshape(-1, 1))]}
        barrier.wait()
        response = server.post(infer_path(model, version), body)
        assert response.status_code == 200, response.text[:2000]
        return {o["name"]: from_json_tensor(o) for o in response.json()["outputs"]}

    with ThreadPoolExecutor(len(batches)) as pool:
        results = list(pool.map(send, batches))
    return list(zip(batches, results))


@pytest.mark.parametrize("model", MODELS)
def test_dynamic_batching(repository_copy, start_server, model):
    repository = repository_copy(model)
    (repository / model / "config.pbtxt").write_text(batched_config(model))
    triton = start_server(repository)
    version = latest_version(model)
    refs = cases(model, version)
    if model == ENCODER:
        # Short texts of different lengths, so that a batch's padding exceeds most
        # requests' own longest text.
        refs = sorted(refs, key=lambda ref: len(ref["input_ids"]))[:6]
    before = model_stats(triton, model, version)

    results = concurrent_requests(triton, model, version, refs)

    for batch, outputs in results:
        count = len(batch)
        assert set(outputs) == set(OUTPUTS[model])
        if model == CLASSIFIER:
            assert outputs["sentiment_score"].shape == (count, 3)
            assert outputs["sentiment_label"].shape == (count, 1)
            outputs["sentiment_label"] = outputs["sentiment_label"].reshape(count)
        else:
            assert outputs["embedding"].shape == (count, HIDDEN)
        assert_matches(model, outputs, batch)

    requests_sent = len(results)
    rows = sum(len(batch) for batch, _ in results)
    after = settled_stats(triton, model, version, successes(before) + requests_sent)
    assert successes(after) - successes(before) == requests_sent
    assert after["inference_count"] - before["inference_count"] == rows
    executions = after["execution_count"] - before["execution_count"]
    assert executions < requests_sent, f"{requests_sent} requests ran in {executions} executions"
    assert executions >= -(-rows // MAX_BATCH_SIZE)
    assert all(entry["batch_size"] <= MAX_BATCH_SIZE for entry in after["batch_stats"])


# --- 10. gRPC ---


@pytest.mark.parametrize("model", MODELS)
def test_grpc_ready_and_two_texts(clients, model):
    assert clients.grpc.is_server_live() and clients.grpc.is_server_ready()
    for version in VERSIONS:
        assert clients.grpc.is_model_ready(model, version)
    metadata = clients.grpc.get_model_metadata(model, as_json=True)
    expected = METADATA[model]
    assert [i["name"] for i in metadata["inputs"]] == [i["name"] for i in expected["inputs"]]
    assert [o["name"] for o in metadata["outputs"]] == [o["name"] for o in expected["outputs"]]
    refs = cases(model, latest_version(model))[:2]
    outputs = clients.infer("grpc", model, None, text_inputs(refs))
    assert set(outputs) == set(OUTPUTS[model])
    assert_matches(model, outputs, refs)
