"""Bad requests: each is answered with a 400 naming its cause, only to the request that
caused it, and the server keeps serving.

Most cases run against the session `server` (the example repository, every model
loaded). After every test an autouse fixture checks the server is still healthy and
still answers good requests to both models.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import (
    bytes_tensor,
    MODEL_REPOSITORY,
    running_server,
    assert_error,
    assert_serves,
    error_message,
    infer,
    int64_input,
    outputs_by_name,
    text_input,
    without_warmup,
)

CLASSIFIER = "sentiment-classifier"
ENCODER = "bert-base"
MODELS = [CLASSIFIER, ENCODER]
MAX_SEQUENCE_LENGTH = 128  # max_sequence_length in both example configs
GOOD_TEXT = [text_input(["A fine sentence."])]


@pytest.fixture(autouse=True)
def still_serving_afterwards(server):
    """After every test: the session server is alive, ready and serves both models."""
    yield
    assert server.is_healthy(), server.log()[-5000:]
    for model in MODELS:
        assert_serves(server, model)


def infer_binary(server, model: str, name: str, shape, payload: bytes, datatype="BYTES"):
    """One input sent raw with the binary tensor extension (bypasses client-side checks)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(shape),
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    return server.post(
        f"/v2/models/{model}/infer",
        data=header + payload,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )


def assert_error_matches(response, pattern: str, status: int = 400) -> str:
    message = error_message(response)
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert re.search(pattern, message, re.IGNORECASE), f"/{pattern}/ not in error: {message}"
    return message


# --- 1. BYTES framing ------------------------------------------------------------------
#
# Triton's core checks part of the BYTES framing itself before the backend sees the
# request (a length prefix cut short, the element count against the shape); the backend
# checks all of it. Each pattern accepts either layer's wording; with Triton 2.51 the
# layer that answers is noted beside each case.

FRAMING_CASES = {
    # core: "incomplete string length indicator ... expecting 4 bytes but only 2 bytes
    # available"; backend: "BYTES element 0 has a truncated length prefix (2 of 4 bytes)"
    "truncated-prefix-only": (
        [1],
        b"\x05\x00",
        r"truncated length prefix \(2 of 4 bytes\)|incomplete string length indicator.*"
        r"expecting 4 bytes but only 2",
    ),
    "truncated-prefix-after-good-element": (
        [2],
        bytes_tensor(b"ok") + b"\x05\x00",
        r"element 1 has a truncated length prefix|incomplete string length indicator.*"
        r"expecting 4 bytes but only 2",
    ),
    # backend
    "length-past-end": ([1], b"\x05\x00\x00\x00ab", r"declares 5 bytes but only 2 remain"),
    "large-length-past-end": (
        [1],
        struct.pack("<I", 100) + b"short",
        r"declares 100 bytes but only 5 remain",
    ),
    # core
    "fewer-elements-than-shape": (
        [3],
        bytes_tensor(b"a", b"b"),
        r"holds 2 elements but its shape says 3|expected 3 string elements.*got 2",
    ),
    "more-elements-than-shape": (
        [1],
        bytes_tensor(b"a", b"b"),
        r"holds 2 elements but its shape says 1|string elements 2 .*expecting 1",
    ),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", FRAMING_CASES, ids=str)
def test_malformed_bytes_framing(server, model, case):
    shape, payload, pattern = FRAMING_CASES[case]
    response = infer_binary(server, model, "text_input", shape, payload)
    message = assert_error_matches(response, pattern)
    assert "text_input" in message


# --- 2. Text content -------------------------------------------------------------------

TEXT_CASES = {
    "invalid-utf8": ([b"\xff\xfe"], "element 0 is not valid UTF-8"),
    "invalid-utf8-among-good": (
        [b"good", b"fine", b"\xff\xfe", b"ok"],
        "element 2 is not valid UTF-8",
    ),
    "truncated-utf8-sequence": ([b"caf\xc3"], "element 0 is not valid UTF-8"),
    "empty-string": ([b""], "element 0 is empty"),
    "whitespace-only": ([b" \t\n "], "element 0 is empty"),
    "empty-among-good": ([b"good", b"", b"ok"], "element 1 is empty"),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", TEXT_CASES, ids=str)
def test_bad_text_fails_whole_request(server, model, case):
    elements, expected = TEXT_CASES[case]
    response = infer_binary(server, model, "text_input", [len(elements)], bytes_tensor(*elements))
    message = assert_error(response, expected)
    assert "text_input" in message


@pytest.mark.parametrize("model", MODELS)
def test_zero_texts(server, model):
    response = infer(server, model, [text_input([], shape=[0])])
    assert_error(response, "no sequence")


def test_empty_text_through_grpc(server):
    """The same validation reaches gRPC clients as INVALID_ARGUMENT."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("text_input", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([b"fine", b"   "], dtype=np.object_))
        with pytest.raises(InferenceServerException) as raised:
            client.infer(CLASSIFIER, [tensor])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.status()
    assert "element 1 is empty" in raised.value.message()


# --- 3. Datatype and rank --------------------------------------------------------------

def text_as(datatype: str, value) -> dict:
    return {"name": "text_input", "datatype": datatype, "shape": [1], "data": [value]}


DATATYPE_CASES = {
    "text-as-int32": (CLASSIFIER, text_as("INT32", 1)),
    "text-as-fp32": (CLASSIFIER, text_as("FP32", 1.0)),
    "bert-text-as-int32": (ENCODER, text_as("INT32", 1)),
}


@pytest.mark.parametrize("case", DATATYPE_CASES, ids=str)
def test_wrong_datatype(server, case):
    model, tensor = DATATYPE_CASES[case]
    response = infer(server, model, [tensor])
    assert_error(response, "text_input", tensor["datatype"], "BYTES")


def test_wrong_id_datatype(server):
    ids = {"name": "input_ids", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}
    response = infer(server, ENCODER, [ids, int64_input("attention_mask", [[1, 1]])])
    assert_error(response, "input_ids", "INT32", "INT64")


def ids_and_mask_with_shape(shape):
    count = int(np.prod(shape))
    return [
        {"name": "input_ids", "datatype": "INT64", "shape": shape, "data": [101] * count},
        {"name": "attention_mask", "datatype": "INT64", "shape": shape, "data": [1] * count},
    ]


# Triton checks the rank against config.pbtxt; for the pair it names whichever it checks first.
RANK_CASES = {
    "text-rank-2": (CLASSIFIER, [text_input(["hi"], shape=[1, 1])], "text_input"),
    "text-rank-0": (CLASSIFIER, [text_input(["hi"], shape=[])], "text_input"),
    "bert-text-rank-2": (ENCODER, [text_input(["hi"], shape=[1, 1])], "text_input"),
    "ids-rank-1": (ENCODER, ids_and_mask_with_shape([2]), "input_ids|attention_mask"),
    "ids-rank-3": (ENCODER, ids_and_mask_with_shape([1, 1, 2]), "input_ids|attention_mask"),
}


@pytest.mark.parametrize("case", RANK_CASES, ids=str)
def test_wrong_rank(server, case):
    model, inputs, names = RANK_CASES[case]
    response = infer(server, model, inputs)
    assert_error_matches(response, rf"shape.*'({names})'|'({names})'.*shape")


def test_unknown_output_requested(server):
    response = infer(server, CLASSIFIER, GOOD_TEXT, outputs=["sentiment_logits"])
    assert_error(response, "sentiment_logits")


# --- 4. bert-base input forms ----------------------------------------------------------


def ids_and_mask(ids, mask=None):
    """input_ids and attention_mask tensors (mask all ones by default)."""
    mask = mask if mask is not None else [[1] * len(row) for row in ids]
    return [int64_input("input_ids", ids), int64_input("attention_mask", mask)]


TOO_LONG = MAX_SEQUENCE_LENGTH + 1
ENCODER_CASES = {
    "both-forms": (GOOD_TEXT + ids_and_mask([[101, 102]]), ["not both"]),
    "neither-form": ([], ["no input"]),
    "ids-without-mask": (ids_and_mask([[101, 102]])[:1], ["attention_mask", "together"]),
    "mask-without-ids": (ids_and_mask([[101, 102]])[1:], ["input_ids", "together"]),
    "ids-mask-shape-mismatch": (
        [int64_input("input_ids", [[101, 102]]), int64_input("attention_mask", [[1, 1, 1]])],
        ["'input_ids' has shape [1, 2]", "'attention_mask' has [1, 3]"],
    ),
    "id-above-vocabulary": (ids_and_mask([[101, 10**9]]), ["1000000000", "vocabulary"]),
    "negative-id": (ids_and_mask([[-1, 101]]), ["-1", "vocabulary"]),
    "mask-not-binary": (ids_and_mask([[101, 102]], [[1, 2]]), ["attention_mask", "0 and 1"]),
    "ids-longer-than-max": (
        ids_and_mask([[101] * TOO_LONG]),
        [f"{TOO_LONG} tokens", f"at most {MAX_SEQUENCE_LENGTH}"],
    ),
    "zero-length-sequence": (
        [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 0], "data": []},
            {"name": "attention_mask", "datatype": "INT64", "shape": [1, 0], "data": []},
        ],
        ["input_ids", "no tokens"],
    ),
    "zero-sequences": (
        [
            {"name": "input_ids", "datatype": "INT64", "shape": [0, 4], "data": []},
            {"name": "attention_mask", "datatype": "INT64", "shape": [0, 4], "data": []},
        ],
        ["no sequence"],
    ),
}


@pytest.mark.parametrize("case", ENCODER_CASES, ids=str)
def test_bad_encoder_inputs(server, case):
    inputs, fragments = ENCODER_CASES[case]
    response = infer(server, ENCODER, inputs)
    assert_error(response, *fragments)


# --- 5./6. Limits that are not errors --------------------------------------------------

LONG_TEXT = "word " * 5000


def test_overlong_text_is_truncated_for_classifier(server):
    response = infer(server, CLASSIFIER, [text_input([LONG_TEXT, "short"])])
    assert response.status_code == 200, response.text[:2000]
    outputs = outputs_by_name(response)
    assert outputs["sentiment_score"]["shape"] == [2, 3]
    scores = np.array(outputs["sentiment_score"]["data"]).reshape(2, 3)
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)


def test_overlong_text_is_truncated_for_encoder(server):
    response = infer(server, ENCODER, [text_input([LONG_TEXT])])
    assert response.status_code == 200, response.text[:2000]
    outputs = outputs_by_name(response)
    assert outputs["last_hidden_state"]["shape"] == [1, MAX_SEQUENCE_LENGTH, 64]
    assert outputs["embedding"]["shape"] == [1, 64]
    assert np.all(np.isfinite(outputs["embedding"]["data"]))


def words(seed: str, size: int) -> str:
    """About `size` bytes of distinct words."""
    count = size // (len(seed) + 6)
    return " ".join(f"{seed}{i % 9973}" for i in range(count))


NEAR_THE_BYTE_LIMIT = (1 << 20) - (64 << 10)
KEPT = "The film was wonderful, the acting superb and the music moving. " * 30  # > 128 tokens


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER])
def test_a_text_of_a_megabyte_keeps_its_first_tokens(server, model):
    """Only a text's start is tokenized: what follows its first 128 tokens, a megabyte of
    other words, changes nothing in the answer."""
    texts = [KEPT + words(" alpha", NEAR_THE_BYTE_LIMIT), KEPT + words(" beta", 4096), KEPT]
    response = infer(server, model, [text_input(texts)])
    assert response.status_code == 200, response.text[:2000]
    output = "sentiment_score" if model == CLASSIFIER else "embedding"
    rows = np.array(outputs_by_name(response)[output]["data"]).reshape(3, -1)
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])


def test_a_prompt_of_a_megabyte_keeps_its_last_tokens(server):
    """Only a prompt's end is tokenized: before its last 127 tokens, a megabyte of other
    words changes nothing in the continuation."""
    prompts = [words("alpha ", NEAR_THE_BYTE_LIMIT) + KEPT, words("beta ", 4096) + KEPT]
    body = {
        "inputs": [text_input(prompts)],
        "parameters": {"max_new_tokens": 8, "do_sample": False},
    }
    response = server.post("/v2/models/gpt2-small/infer", body)
    assert response.status_code == 200, response.text[:2000]
    texts = outputs_by_name(response)["generated_text"]["data"]
    continuations = [text[len(prompt) :] for text, prompt in zip(texts, prompts)]
    assert all(text.startswith(prompt) for text, prompt in zip(texts, prompts))
    assert continuations[0] == continuations[1] and continuations[0], continuations


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER, "gpt2-small"])
def test_text_over_the_byte_limit_is_refused_before_tokenizing(server, model):
    """Texts longer than max_text_bytes (default 1 MiB) are refused at once: tokenizing
    them whole would stall the instance (a 5 MB text took seconds)."""
    limit = 1 << 20
    started = time.monotonic()
    response = infer(server, model, [text_input(["ok", "a" * (limit + 1)])])
    assert_error(response, "element 1", f"{limit + 1} bytes", "max_text_bytes")
    assert time.monotonic() - started < 5
    # At the limit it is served (and truncated to the context).
    just_fits = "a " * (limit // 2)
    body = {"inputs": [text_input([just_fits])]}
    if model == "gpt2-small":
        body["parameters"] = {"max_new_tokens": 1}
    assert server.post(f"/v2/models/{model}/infer", body).status_code == 200


MANY = 64


def test_many_texts_in_one_request(server):
    texts = [f"Sentence number {i} is {'great' if i % 2 else 'terrible'}." for i in range(MANY)]
    response = infer(server, CLASSIFIER, [text_input(texts)])
    assert response.status_code == 200, response.text[:2000]
    outputs = outputs_by_name(response)
    assert outputs["sentiment_score"]["shape"] == [MANY, 3]
    assert outputs["sentiment_label"]["shape"] == [MANY]
    assert set(outputs["sentiment_label"]["data"]) <= {"negative", "neutral", "positive"}

    response = infer(server, ENCODER, [text_input(texts)], outputs=["embedding"])
    assert response.status_code == 200, response.text[:2000]
    embedding = outputs_by_name(response)["embedding"]
    assert embedding["shape"] == [MANY, 64]
    norms = np.linalg.norm(np.array(embedding["data"]).reshape(MANY, 64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)


# --- 7. Errors go to the request that caused them --------------------------------------


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """The classifier with dynamic batching, so concurrent requests share one execute."""
    root = tmp_path_factory.mktemp("batching")
    repository = root / "model-repository"
    model_dir = repository / CLASSIFIER
    shutil.copytree(MODEL_REPOSITORY / CLASSIFIER / "1", model_dir / "1")
    # The warm-up sample is shaped for max_batch_size 0.
    config = without_warmup((MODEL_REPOSITORY / CLASSIFIER / "config.pbtxt").read_text())
    text, score, label = (
        f'name: "{name}", data_type: {datatype}, dims: '
        for name, datatype in [
            ("text_input", "TYPE_STRING"),
            ("sentiment_score", "TYPE_FP32"),
            ("sentiment_label", "TYPE_STRING"),
        ]
    )
    replacements = {
        "max_batch_size: 0": "max_batch_size: 16",
        "dynamic_batching {": "dynamic_batching {\n  max_queue_delay_microseconds: 200000",
        f"{text}[ -1 ]": f"{text}[ 1 ]",
        f"{score}[ -1, 3 ]": f"{score}[ 3 ]",
        f"{label}[ -1 ]": f"{label}[ 1 ]",
    }
    for old, new in replacements.items():
        assert old in config, f"config.pbtxt changed: {old!r} not found"
        config = config.replace(old, new)
    (model_dir / "config.pbtxt").write_text(config)
    with running_server(repository, root / "tritonserver.log") as triton:
        yield triton


def execution_counts(server, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) summed over the model's versions, once they
    settle: the backend reports a request's statistics just after its response goes out,
    so a client can hold its answer before the count includes it."""

    def read() -> tuple[int, int]:
        stats = server.get(f"/v2/models/{model}/stats").json()["model_stats"]
        return (
            sum(s["inference_count"] for s in stats),
            sum(s["execution_count"] for s in stats),
        )

    counts = read()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        latest = read()
        if latest == counts:
            return counts
        counts = latest
    return counts


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "dynamic-batching"])
def test_error_goes_only_to_its_request(request, server, batched):
    triton = request.getfixturevalue("batching_server") if batched else server
    # The batched config sends texts as [B, 1]; the example one as [N].
    shape = [1, 1] if batched else [1]
    good = [f"Concurrent request {i} is lovely." for i in range(12)]
    bad_index = 5
    bodies = [
        text_input([text], shape=shape) if i != bad_index else text_input([""], shape=shape)
        for i, text in enumerate(good)
    ]
    before = execution_counts(triton, CLASSIFIER)
    start = threading.Barrier(len(bodies))

    def send(body):
        start.wait()
        return infer(triton, CLASSIFIER, [body])

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))

    for i, response in enumerate(responses):
        if i == bad_index:
            assert_error(response, "element 0 is empty")
        else:
            assert response.status_code == 200, (i, response.text[:2000])
            outputs = outputs_by_name(response)
            assert outputs["sentiment_score"]["shape"] == [1, 3]
            assert outputs["sentiment_label"]["shape"] == shape
    after = execution_counts(triton, CLASSIFIER)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(good) - 1, (before, after)
    if batched:
        # Several requests shared an execution: the bad one was answered apart from them.
        assert executions < len(good), (before, after)
    assert triton.is_healthy()
