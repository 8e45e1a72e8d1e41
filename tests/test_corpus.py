"""The committed bad-input corpus (tests/corpus/bad_inputs.json) replayed against every
model it applies to, over HTTP JSON, the HTTP binary extension and gRPC: each case gets
a 4xx (gRPC INVALID_ARGUMENT) whose message names the problem, the server stays healthy,
and a good request right after gets the right answer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import bytes_tensor, error_message, text_input

CORPUS = json.loads((Path(__file__).parent / "corpus" / "bad_inputs.json").read_text())
GROUPS = {
    "text": ["sentiment-classifier", "bert-base", "gpt2-small", "sentiment-classifier-ab", "gpt2-small-ab"],
    "encoders": ["sentiment-classifier", "bert-base", "sentiment-classifier-ab"],
    "generation": ["gpt2-small", "gpt2-small-ab"],
    "ids": ["bert-base"],
}
# A good request per model, and the output it is checked by.
GOOD = {
    "sentiment-classifier": ({"inputs": [text_input(["A fine day."])]}, "sentiment_score"),
    "bert-base": ({"inputs": [text_input(["A fine day."])]}, "embedding"),
    "gpt2-small": (
        {"inputs": [text_input(["Hello"])], "parameters": {"do_sample": False, "max_new_tokens": 4}},
        "generated_text",
    ),
}
ROUTED = {"sentiment-classifier-ab": "sentiment-classifier", "gpt2-small-ab": "gpt2-small"}


def elements(spec: dict) -> list:
    """The input's elements: texts (str) or numbers."""
    if "texts" in spec:
        return spec["texts"]
    if "repeat" in spec:
        piece, times = spec["repeat"]
        return [piece * times]
    if "repeat_elements" in spec:
        piece, times = spec["repeat_elements"]
        return [piece] * times
    if "int64_repeat" in spec:
        value, times = spec["int64_repeat"]
        return [value] * times
    return spec.get("int64") or spec.get("int32")


def raw(spec: dict) -> bytes:
    """The input in Triton's byte layout."""
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    values = elements(spec)
    if spec["datatype"] == "BYTES":
        return bytes_tensor(*(t.encode() for t in values))
    code = {"INT64": "q", "INT32": "i"}[spec["datatype"]]
    return struct.pack(f"<{len(values)}{code}", *values)


def send_json(server, model: str, case: dict):
    inputs = [
        {"name": s["name"], "datatype": s["datatype"], "shape": s["shape"], "data": elements(s)}
        for s in case["inputs"]
    ]
    body = {"inputs": inputs, **({"parameters": case["parameters"]} if "parameters" in case else {})}
    response = server.post(f"/v2/models/{model}/infer", body)
    return response.status_code, error_message(response)


def send_binary(server, model: str, case: dict):
    payloads = [raw(s) for s in case["inputs"]]
    header = {
        "inputs": [
            {"name": s["name"], "datatype": s["datatype"], "shape": s["shape"],
             "parameters": {"binary_data_size": len(p)}}
            for s, p in zip(case["inputs"], payloads)
        ]
    }
    if "parameters" in case:
        header["parameters"] = case["parameters"]
    header = json.dumps(header).encode()
    response = server.post(
        f"/v2/models/{model}/infer",
        data=header + b"".join(payloads),
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )
    return response.status_code, error_message(response)


def grpc_parameter(value) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service_pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return service_pb2.InferParameter(double_param=value)
    return service_pb2.InferParameter(string_param=value)


def send_grpc(server, model: str, case: dict):
    request = service_pb2.ModelInferRequest(model_name=model)
    for spec in case["inputs"]:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = spec["name"], spec["datatype"]
        tensor.shape.extend(spec["shape"])
        request.raw_input_contents.append(raw(spec))
    for key, value in case.get("parameters", {}).items():
        request.parameters[key].CopyFrom(grpc_parameter(value))
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


SENDERS = {"json": send_json, "binary": send_binary, "grpc": send_grpc}


def replays():
    for case in CORPUS["cases"]:
        for model in GROUPS[case["models"]]:
            for protocol in SENDERS:
                if protocol == "json" and not case["json"]:
                    continue
                yield pytest.param(case, model, protocol, id=f"{case['case']}-{model}-{protocol}")


def good_answer(server, model: str):
    """The output that checks `model`, and the version that computed it."""
    body, output = GOOD[ROUTED.get(model, model)]
    response = server.post(f"/v2/models/{model}/infer", body)
    assert response.status_code == 200, response.text[:2000]
    answer = response.json()
    version = answer.get("parameters", {}).get("ab_model_version", answer["model_version"])
    data = next(o["data"] for o in answer["outputs"] if o["name"] == output)
    return version, data


@pytest.mark.parametrize("case, model, protocol", replays())
def test_bad_input_is_refused_and_the_model_keeps_answering_right(server, case, model, protocol):
    status, message = SENDERS[protocol](server, model, case)
    if protocol == "grpc":
        assert status == grpc.StatusCode.INVALID_ARGUMENT, (status, message)
    else:
        assert 400 <= status < 500, (status, message)
    assert case["expect"].lower() in message.lower(), f"{case['expect']!r} not in: {message}"
    assert server.is_healthy()
    version, data = good_answer(server, model)
    target = ROUTED.get(model, model)
    body, output = GOOD[target]
    expected = server.post(f"/v2/models/{target}/versions/{version}/infer", body).json()
    assert data == next(o["data"] for o in expected["outputs"] if o["name"] == output)
