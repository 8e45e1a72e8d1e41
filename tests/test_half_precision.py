"""Half-precision exports (float16 or bfloat16 inputs and outputs: logits, hidden
states, the KV cache) serve like the float32 model they came from: the classifier's
scores and labels, the encoder's embeddings, and generation (one response, streaming,
and concurrent requests that join and leave one running batch) within the precision of
their type. A decoder whose cache this build cannot run, or an output that is not a
float, fails its load with a message that says so.

The half-precision models are copies of the bundled ones whose graph casts at its edges
(tests/model_edits.py): what the backend sees of an `optimum-cli export onnx --fp16`
model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest

from conftest import (
    MODEL_REPOSITORY,
    copy_models,
    infer,
    outputs_by_name,
    repository_index,
    running_server,
    text_input,
)
from model_edits import retype_graph, retyped_copy
from test_export import DECODER, make_export, run_export

TEXTS = ["What a wonderful day!", "The food was cold and late.", "It was fine, I guess."]
PROMPTS = ["Once upon a time", "The weather today", "In a small village"]
# Absolute tolerance per type, against float32 (float16 keeps 11 significant bits,
# bfloat16 8).
TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A server with the bundled models and half-precision copies of their version 1,
    `<model>-float16` and `<model>-bfloat16`, and one whose output is an integer."""
    repository = copy_models(tmp_path_factory.mktemp("repository"), "sentiment-classifier",
                             "bert-base", "gpt2-small", "gpt2-small-stream")
    for model in ["sentiment-classifier", "bert-base", "gpt2-small", "gpt2-small-stream"]:
        for precision in TOLERANCE:
            retyped_copy(MODEL_REPOSITORY / model, repository / f"{model}-{precision}",
                         f"{model}-{precision}", precision)
    retyped_copy(MODEL_REPOSITORY / "sentiment-classifier",
                 repository / "sentiment-classifier-int64", "sentiment-classifier-int64",
                 "int64")
    args = ["--exit-on-error=false", "--strict-readiness=false"]
    with running_server(repository, tmp_path_factory.mktemp("half") / "tritonserver.log",
                        args=args) as triton:
        yield triton


def version_1(server, model: str, body: dict) -> dict:
    response = server.post(f"/v2/models/{model}/versions/1/infer", body)
    assert response.status_code == 200, (model, response.text[:2000])
    return outputs_by_name(response)


@pytest.mark.parametrize("precision", TOLERANCE)
@pytest.mark.parametrize("model, output", [
    ("sentiment-classifier", "sentiment_score"),
    ("bert-base", "embedding"),
])
def test_an_encoder_answers_as_its_float32_model(half, model, output, precision):
    body = {"inputs": [text_input(TEXTS)]}
    expected = version_1(half, model, body)
    got = version_1(half, f"{model}-{precision}", body)
    assert got[output]["datatype"] == "FP32"
    assert got[output]["shape"] == expected[output]["shape"]
    difference = np.abs(np.array(got[output]["data"]) - np.array(expected[output]["data"]))
    assert difference.max() < TOLERANCE[precision], difference.max()
    # Rounding moves the values, so they differ from float32's (else nothing was cast).
    assert difference.max() > 0
    if model == "sentiment-classifier":
        assert got["sentiment_label"]["data"] == expected["sentiment_label"]["data"]


def generate(server, model: str, prompt: str, **parameters) -> str:
    body = {"inputs": [text_input([prompt])],
            "parameters": {"do_sample": False, "max_new_tokens": 24, **parameters}}
    return version_1(server, model, body)["generated_text"]["data"][0]


def test_float16_generation_gives_the_float32_models_greedy_text_in_one_running_batch(half):
    expected = {prompt: generate(half, "gpt2-small", prompt) for prompt in PROMPTS}
    # Alone, then concurrently: rows join the batch and leave it at different steps, so
    # the float16 cache is merged with each join and leave.
    for prompt in PROMPTS:
        assert generate(half, "gpt2-small-float16", prompt) == expected[prompt]
    lengths = [24, 7, 15, 3, 24, 11]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(
            lambda i: generate(half, "gpt2-small-float16", PROMPTS[i % 3],
                               max_new_tokens=lengths[i]),
            range(len(lengths))))
    for i, answer in enumerate(answers):
        short = generate(half, "gpt2-small", PROMPTS[i % 3], max_new_tokens=lengths[i])
        assert answer == short, (i, answer, short)
    # Sampling (the plain sampler and the sorted one) runs on float16 logits too.
    for parameters in [{"do_sample": True, "seed": 3}, {"do_sample": True, "top_k": 5, "seed": 3}]:
        text = generate(half, "gpt2-small-float16", PROMPTS[0], **parameters)
        assert text.startswith(PROMPTS[0]) and len(text) > len(PROMPTS[0]), text


def test_a_float16_stream_adds_up_to_the_one_response_text(half):
    body = {"text_input": PROMPTS[1], "parameters": {"do_sample": False, "max_new_tokens": 24}}
    response = half.post("/v2/models/gpt2-small-stream-float16/versions/1/generate_stream", body)
    assert response.status_code == 200, response.text
    events = [json.loads(line.removeprefix("data: "))
              for line in response.text.splitlines() if line.startswith("data: ")]
    streamed = "".join(event["text_output"] for event in events)
    assert PROMPTS[1] + streamed == generate(half, "gpt2-small", PROMPTS[1])


def test_what_cannot_be_served_fails_its_load_saying_why(half):
    index = repository_index(half)
    reasons = {name: entries[0].get("reason", "") for name, entries in index.items()}
    assert "KV cache is bfloat16" in reasons["gpt2-small-bfloat16"], reasons
    assert "KIND_CPU" in reasons["gpt2-small-bfloat16"], reasons
    assert "output 'logits' holds i64" in reasons["sentiment-classifier-int64"], reasons
    assert "float32, float16 or bfloat16" in reasons["sentiment-classifier-int64"], reasons
    response = infer(half, "sentiment-classifier-float16", [text_input(TEXTS[:1])])
    assert response.status_code == 200, response.text


def test_a_float16_export_is_laid_out_by_the_export_tool_and_served(tmp_path, server):
    """docs/real-models.md: `export_models.py --exported` lays out a half-precision
    export made elsewhere as it is."""
    exported = make_export(tmp_path / "export", DECODER)
    model = onnx.load(exported / "model.onnx")
    retype_graph(model, "float16")
    onnx.save(model, exported / "model.onnx")
    repository = tmp_path / "repository"
    done = run_export(DECODER, "--exported", str(exported), "--repository", str(repository))
    assert done.returncode == 0, done.stderr
    with running_server(repository, tmp_path / "tritonserver.log") as triton:
        assert generate(triton, DECODER, PROMPTS[2]) == generate(server, DECODER, PROMPTS[2])
