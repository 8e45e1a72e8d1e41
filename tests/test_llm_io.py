"""The generation I/O of Triton's vLLM backend, through a real tritonserver: a
`sampling_parameters` JSON string, `exclude_input_in_output`, and the `return_*` flags
for `finish_reason`, `num_input_tokens` and `num_output_tokens`, on gpt2-small (one
response) and gpt2-small-stream (decoupled). Greedy results are compared with the
transformers reference (tests/reference/gpt2-small.json, version 1)."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import assert_error, load_reference, outputs_by_name, text_input

WHOLE = "gpt2-small"
STREAM = "gpt2-small-stream"
VERSION = "1"
REFERENCE = load_reference(WHOLE)
CASES = REFERENCE["versions"][VERSION]
TOKENS = REFERENCE["max_new_tokens"]
GREEDY = json.dumps({"max_tokens": TOKENS, "temperature": 0})


def flag(name: str, value: bool = True) -> dict:
    return {"name": name, "shape": [1], "datatype": "BOOL", "data": [value]}


def sampling(text: str) -> dict:
    return text_input([text], name="sampling_parameters")


def infer(server, model: str, inputs: list[dict], outputs=None):
    body = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return server.post(f"/v2/models/{model}/versions/{VERSION}/infer", body)


def test_sampling_parameters_drive_greedy_generation(server):
    for case in CASES:
        response = infer(server, WHOLE, [text_input([case["prompt"]]), sampling(GREEDY)])
        assert response.status_code == 200, response.text
        assert outputs_by_name(response)["generated_text"]["data"] == [
            case["prompt"] + case["new_text"]
        ]


def test_exclude_input_in_output_leaves_the_prompt_out(server):
    case = CASES[0]
    response = infer(server, WHOLE, [
        text_input([case["prompt"]]), sampling(GREEDY), flag("exclude_input_in_output"),
    ])
    assert response.status_code == 200, response.text
    assert outputs_by_name(response)["generated_text"]["data"] == [case["new_text"]]
    # On the streaming model's one-response mode, as vLLM's /generate clients use it.
    body = {"text_input": case["prompt"], "stream": False, "exclude_input_in_output": True,
            "sampling_parameters": GREEDY}
    response = server.post(f"/v2/models/{STREAM}/versions/{VERSION}/generate", body)
    assert response.status_code == 200, response.text
    assert response.json()["text_output"] == case["new_text"]


def test_return_flags_add_finish_reason_and_token_counts(server):
    prompts = [case["prompt"] for case in CASES[:2]]
    inputs = [text_input(prompts), sampling(json.dumps({"max_tokens": 5, "temperature": 0})),
              flag("return_finish_reason"), flag("return_num_input_tokens"),
              flag("return_num_output_tokens")]
    outputs = outputs_by_name(infer(server, WHOLE, inputs))
    assert outputs["finish_reason"]["data"] == ["length", "length"]
    assert outputs["num_input_tokens"]["datatype"] == "UINT32"
    assert outputs["num_input_tokens"]["data"] == [len(c["input_ids"]) for c in CASES[:2]]
    assert outputs["num_output_tokens"]["data"] == [5, 5]
    # A stop string of the continuation ends the sequence with "stop".
    stop = json.dumps({"max_tokens": TOKENS, "temperature": 0,
                       "stop": [CASES[0]["new_text"][4:8]]})
    inputs = [text_input(prompts[:1]), sampling(stop), flag("return_finish_reason")]
    assert outputs_by_name(infer(server, WHOLE, inputs))["finish_reason"]["data"] == ["stop"]
    # Without the flags, or without the output requested, none of them.
    plain = outputs_by_name(infer(server, WHOLE, [text_input(prompts), sampling(GREEDY)]))
    assert set(plain) == {"generated_text"}
    only_text = outputs_by_name(infer(server, WHOLE, inputs, outputs=["generated_text"]))
    assert set(only_text) == {"generated_text"}


def test_the_stream_answers_like_vllm(server):
    """gRPC streaming with the inputs genai-perf sends: the pieces make up the greedy
    continuation, and the final response carries the finish reason and counts."""
    case = CASES[1]
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, datatype, value in [
        ("text_input", "BYTES", np.array([case["prompt"]], dtype=object)),
        ("stream", "BOOL", np.array([True])),
        ("sampling_parameters", "BYTES", np.array([GREEDY], dtype=object)),
        ("exclude_input_in_output", "BOOL", np.array([True])),
        ("return_finish_reason", "BOOL", np.array([True])),
        ("return_num_output_tokens", "BOOL", np.array([True])),
    ]:
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer(STREAM, inputs, model_version=VERSION,
                              enable_empty_final_response=True)
    pieces, final = [], None
    while final is None:
        result, error = responses.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            final = result
        pieces.append(result.as_numpy("text_output"))
    client.stop_stream()
    client.close()
    text = "".join(piece[0].decode() for piece in pieces if piece is not None)
    assert text == case["new_text"]
    assert final.as_numpy("finish_reason")[0] == b"length"
    assert final.as_numpy("num_output_tokens")[0] == TOKENS
    assert final.as_numpy("num_input_tokens") is None


@pytest.mark.parametrize("parameters, fragment", [
    ('{"min_tokens": 4}', "'min_tokens' is not supported here"),
    ('{"logit_bias": {"1": 2}}', "'logit_bias' is not supported"),
    ('{"max_tokens": "ten"}', "'max_tokens' has the wrong type"),
    # A value the generation parameters refuse names the field the client sent, too.
    ('{"max_tokens": 0}',
     "input 'sampling_parameters': field 'max_tokens': parameter 'max_new_tokens' must be "
     "between 1"),
    ('{"stop": ["a", ""]}', "field 'stop': parameter 'stop_sequences' must be non-empty strings"),
    ('{"temperature": 0.5, "top_p": 1.5}', "field 'top_p': parameter 'top_p' must be in (0, 1]"),
    ("not json", "not a JSON object"),
])
def test_bad_sampling_parameters_are_a_clear_400(server, parameters, fragment):
    response = infer(server, WHOLE, [text_input(["Hello"]), sampling(parameters)])
    assert_error(response, fragment)


def test_a_setting_sent_both_ways_is_refused(server):
    body = {"inputs": [text_input(["Hello"]), sampling('{"max_tokens": 3}')],
            "parameters": {"max_new_tokens": 4}}
    response = server.post(f"/v2/models/{WHOLE}/versions/{VERSION}/infer", body)
    assert_error(response, "'max_new_tokens' is set both as a request parameter and in "
                           "'sampling_parameters'")
