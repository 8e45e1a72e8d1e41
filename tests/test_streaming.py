"""Token streaming: the decoupled model gpt2-small-stream (the gpt2-small version 1
decoder) through a real tritonserver, over POST .../generate_stream (SSE),
POST .../generate and gRPC bidirectional streaming.

The streamed pieces are checked against tests/reference/gpt2-small.json (greedy, from
Hugging Face transformers) and against the non-streaming model, so a piece that is lost,
doubled or split inside a character shows up as a mismatch.
"""

from __future__ import annotations

import json
import queue
import socket
import time
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import copy_models, load_reference, running_server

MODEL = "gpt2-small-stream"
# Version 1 of the streaming model has gpt2-small version 1's decoder files.
MODEL_PATH = f"/v2/models/{MODEL}/versions/1"
WHOLE_MODEL = "gpt2-small"
REFERENCE = load_reference(WHOLE_MODEL)
CASES = REFERENCE["versions"]["1"]
GREEDY = {"do_sample": False, "max_new_tokens": REFERENCE["max_new_tokens"]}
SHIPPED_TEXT_INPUT = '{ name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] }'


@pytest.fixture(scope="module")
def several(tmp_path_factory):
    """A server whose gpt2-small-stream declares text_input dims [ -1 ]: N prompts per
    request (the shipped config takes one, as Triton's vLLM backend does)."""
    repository = copy_models(tmp_path_factory.mktemp("repository"), WHOLE_MODEL, MODEL)
    config = repository / MODEL / "config.pbtxt"
    assert SHIPPED_TEXT_INPUT in config.read_text()
    config.write_text(config.read_text().replace(
        SHIPPED_TEXT_INPUT, SHIPPED_TEXT_INPUT.replace("[ 1 ]", "[ -1 ]")))
    with running_server(repository, tmp_path_factory.mktemp("several") / "tritonserver.log") as triton:
        yield triton


@pytest.fixture(autouse=True)
def healthy_afterwards(server):
    yield
    assert server.is_healthy(), server.log()[-5000:]


# --- HTTP generate extension ---------------------------------------------------------


def sse_events(response) -> list[dict]:
    """The JSON objects of a text/event-stream body."""
    assert response.status_code == 200, (response.status_code, response.text[:2000])
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
    return events


def generate_stream(server, body: dict) -> list[dict]:
    return sse_events(server.post(f"{MODEL_PATH}/generate_stream", body))


def test_generate_stream_sends_pieces_that_add_up_to_the_reference(server):
    for ref in CASES:
        events = generate_stream(server, {"text_input": ref["prompt"], "parameters": GREEDY})
        assert all("error" not in e for e in events), events
        pieces = [e["text_output"] for e in events]
        # One event per decoded piece plus the final one: many, not one blob.
        assert len(pieces) >= REFERENCE["max_new_tokens"] // 2, pieces
        assert "".join(pieces) == ref["new_text"], ref["prompt"]
        assert all(e["model_name"] == MODEL and e["model_version"] == "1" for e in events)


def test_generate_with_stream_false_answers_once_like_the_whole_model(server):
    ref = CASES[0]
    expected = ref["prompt"] + ref["new_text"]
    # `stream` as an input (the common convention) and as a request parameter.
    for body in (
        {"text_input": ref["prompt"], "stream": False, "parameters": GREEDY},
        {"text_input": ref["prompt"], "parameters": dict(GREEDY, stream=False)},
    ):
        response = server.post(f"{MODEL_PATH}/generate", body)
        assert response.status_code == 200, response.text
        assert response.json()["text_output"] == expected
    whole = server.post(f"/v2/models/{WHOLE_MODEL}/versions/1/generate",
                        {"text_input": ref["prompt"], "parameters": GREEDY})
    assert whole.json()["generated_text"] == expected


def test_generate_without_stream_false_is_refused_by_triton(server):
    """/generate takes exactly one response, so a stream needs `stream: false` there.
    Triton 2.51 reports this in the body (with HTTP 200, as the headers already went out)."""
    response = server.post(f"{MODEL_PATH}/generate",
                           {"text_input": "Hello", "parameters": {"max_new_tokens": 3}})
    assert "exactly 1 response" in response.json()["error"], response.text


def test_stream_true_on_the_whole_model_is_a_clear_error(server):
    response = server.post(f"/v2/models/{WHOLE_MODEL}/generate",
                           {"text_input": "Hello", "parameters": {"stream": True}})
    assert response.status_code == 400, response.text
    assert "decoupled" in response.json()["error"]


def test_stop_string_is_never_streamed(server):
    ref = CASES[1]
    # Stop at a word inside the greedy continuation; its first characters arrive in
    # pieces before the whole word is known and must be held back.
    stop = " engineers"
    assert stop in ref["new_text"]
    expected = ref["new_text"][: ref["new_text"].index(stop)]
    events = generate_stream(
        server, {"text_input": ref["prompt"], "parameters": dict(GREEDY, stop=stop)}
    )
    pieces = [e["text_output"] for e in events]
    assert "".join(pieces) == expected
    assert not any(" engi" in p for p in pieces)


def test_invalid_parameter_is_an_error_event(server):
    response = server.post(f"{MODEL_PATH}/generate_stream",
                           {"text_input": "Hello", "parameters": {"temperature": -1}})
    assert "temperature" in response.text, response.text


# --- gRPC streaming ----------------------------------------------------------------------


def grpc_text(texts, name="text_input"):
    tensor = grpcclient.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def grpc_stream(server, inputs, parameters, timeout=60.0):
    """Sends one request on a gRPC stream; returns ([pieces per response], error)."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), answers))
    try:
        client.async_stream_infer(
            MODEL,
            inputs,
            model_version="1",
            parameters=parameters,
            enable_empty_final_response=True,
        )
        responses = []
        deadline = time.monotonic() + timeout
        while True:
            result, error = answers.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                return responses, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            output = result.as_numpy("text_output")
            if output is not None:
                # Strict decoding: a piece split inside a character fails here.
                responses.append([piece.decode("utf-8", errors="strict") for piece in output])
            if final:
                return responses, None
    finally:
        client.stop_stream()
        client.close()


def test_grpc_stream_of_several_prompts(several):
    prompts = [ref["prompt"] for ref in CASES]
    responses, error = grpc_stream(several, [grpc_text(prompts)], GREEDY)
    assert error is None, error
    assert len(responses) > 2
    assert all(len(r) == len(prompts) for r in responses)
    for i, ref in enumerate(CASES):
        assert "".join(r[i] for r in responses) == ref["new_text"], ref["prompt"]


def test_grpc_stream_false_gives_one_response(server):
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([False]))
    ref = CASES[2]
    responses, error = grpc_stream(server, [grpc_text([ref["prompt"]]), flag], GREEDY)
    assert error is None, error
    assert responses == [[ref["prompt"] + ref["new_text"]]]


def test_grpc_stream_rejects_a_bad_stream_input(server):
    flag = grpcclient.InferInput("stream", [1], "INT32")
    flag.set_data_from_numpy(np.array([1], dtype=np.int32))
    responses, error = grpc_stream(server, [grpc_text(["Hi"]), flag], GREEDY)
    assert responses == [] and error is not None
    assert "stream" in str(error)


def test_multibyte_text_is_never_split(several):
    """Sampling over a byte-level vocabulary produces partial UTF-8 sequences; every
    piece still decodes strictly, and the pieces add up to the one-response text."""
    params = {"do_sample": True, "temperature": 1.5, "seed": 7, "max_new_tokens": 60}
    prompts = ["Grüße aus 東京 🎉", "naïve café — ok"]
    responses, error = grpc_stream(several, [grpc_text(prompts)], params)
    assert error is None, error
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([False]))
    (whole,), error = grpc_stream(several, [grpc_text(prompts), flag], params)
    assert error is None, error
    for i, prompt in enumerate(prompts):
        assert prompt + "".join(r[i] for r in responses) == whole[i]


def inference_stats(server) -> dict:
    stats = server.get(f"/v2/models/{MODEL}/versions/1/stats").json()
    return stats["model_stats"][0]["inference_stats"]


LONG_JOB = {"max_new_tokens": 120, "do_sample": True, "seed": 3}
LONG_PROMPTS = ["Once upon a time"] * 32


def assert_abandoned_early(server, abandon) -> None:
    """Times LONG_JOB run to the end, then runs `abandon()` (which starts the same job
    and walks away from it) and checks the backend gave up within half that time: the
    request counts as failed, having run for less than half of the full job."""
    started = time.monotonic()
    responses, error = grpc_stream(server, [grpc_text(LONG_PROMPTS)], LONG_JOB)
    full_seconds = time.monotonic() - started
    assert error is None and len(responses) > 50
    before = inference_stats(server)
    abandon()
    deadline = time.monotonic() + 60
    while inference_stats(server)["fail"]["count"] == before["fail"]["count"]:
        assert time.monotonic() < deadline, "the abandoned request never finished"
        time.sleep(0.05)
    abandoned_ns = inference_stats(server)["fail"]["ns"] - before["fail"]["ns"]
    assert abandoned_ns < full_seconds * 1e9 / 2, (
        f"the abandoned request ran {abandoned_ns / 1e9:.3f}s of a {full_seconds:.3f}s job"
    )
    # The instance is free again.
    responses, error = grpc_stream(server, [grpc_text(["Hi"])], {"max_new_tokens": 2})
    assert error is None and responses, error


def test_cancelled_stream_stops_within_a_step_and_frees_the_instance(several):
    def cancel_grpc_stream():
        client = grpcclient.InferenceServerClient(several.grpc_url)
        answers: queue.Queue = queue.Queue()
        client.start_stream(
            callback=partial(lambda q, result, error: q.put((result, error)), answers)
        )
        client.async_stream_infer(
            MODEL, [grpc_text(LONG_PROMPTS)], model_version="1", parameters=LONG_JOB
        )
        answers.get(timeout=60)  # generation is under way
        client.stop_stream(cancel_requests=True)
        client.close()

    assert_abandoned_early(several, cancel_grpc_stream)


def test_sse_client_that_goes_away_stops_the_generation(several):
    """Closing the generate_stream connection cancels the request: the backend sees it
    within a decode step, as with gRPC."""

    def close_sse_connection():
        body = json.dumps({"text_input": LONG_PROMPTS, "parameters": LONG_JOB}).encode()
        with socket.create_connection(("127.0.0.1", several.http_port)) as connection:
            connection.sendall(
                b"POST " + MODEL_PATH.encode() + b"/generate_stream HTTP/1.1\r\n"
                b"Host: localhost\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert b"text/event-stream" in connection.recv(4096)  # under way

    assert_abandoned_early(several, close_sse_connection)


def test_the_shipped_stream_takes_one_prompt_per_request(server):
    """As Triton's vLLM backend: text_input [1]. Two prompts are Triton's own clear
    refusal; the `several` copy above shows dims [ -1 ] lifting it."""
    response = server.post(f"{MODEL_PATH}/generate", {"text_input": ["a", "b"], "stream": False})
    assert response.status_code == 400, response.text
    assert "text_input" in response.text and "shape" in response.text, response.text
