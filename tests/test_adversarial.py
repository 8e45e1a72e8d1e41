"""Regressions for what a hostile client found (issue 9): each case once gave a silent
wrong answer with a 200, and must now get a clear 400 that names the problem, while
the server keeps serving."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import (
    MODEL_REPOSITORY,
    assert_error,
    classifier_config,
    infer,
    int64_input,
    load_model,
    outputs_by_name,
    text_input,
)


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-38, 1e-5])
def test_a_temperature_too_small_to_compute_with_is_refused(server, temperature):
    """Subnormal temperatures returned the prompt alone or garbage bytes."""
    response = server.post(
        "/v2/models/gpt2-small/infer",
        {
            "inputs": [text_input(["The weather today is"])],
            "parameters": {"temperature": temperature, "seed": 1, "max_new_tokens": 8},
        },
    )
    assert_error(response, "'temperature' must be a number > 0, at least 0.0001")
    smallest = server.post(
        "/v2/models/gpt2-small/infer",
        {
            "inputs": [text_input(["The weather today is"])],
            "parameters": {"temperature": 1e-4, "seed": 1, "max_new_tokens": 8},
        },
    )
    assert smallest.status_code == 200, smallest.text
    greedy = server.post(
        "/v2/models/gpt2-small/infer",
        {
            "inputs": [text_input(["The weather today is"])],
            "parameters": {"do_sample": False, "max_new_tokens": 8},
        },
    )
    assert smallest.json()["outputs"] == greedy.json()["outputs"], "1e-4 is greedy in effect"


def test_an_all_zero_attention_mask_row_is_refused(server):
    """A row that attends to nothing got an all-zero, non-normalised embedding."""
    ids = [[101, 1000, 102], [101, 1001, 102]]
    response = infer(
        server,
        "bert-base",
        [int64_input("input_ids", ids), int64_input("attention_mask", [[1, 1, 1], [0, 0, 0]])],
    )
    assert_error(response, "'attention_mask' row 1 is all zeros")
    good = infer(
        server,
        "bert-base",
        [int64_input("input_ids", ids), int64_input("attention_mask", [[1, 1, 1], [1, 1, 0]])],
        outputs=["embedding"],
    )
    assert good.status_code == 200, good.text
    embedding = outputs_by_name(good)["embedding"]
    width = embedding["shape"][1]
    for row in range(2):
        values = embedding["data"][row * width : (row + 1) * width]
        assert abs(sum(v * v for v in values) - 1.0) < 1e-4, "unit length, as documented"
    assert server.is_healthy()


def resident_mib(server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.parametrize("model", ["sentiment-classifier", "bert-base"])
def test_a_request_of_100000_texts_is_refused_before_it_costs_memory(server, model):
    """100,000 tiny texts once took the server from 82 MB to 1.15 GB (sentiment) and
    5.1 GB (bert-base, a 636 MB response), and the memory stayed taken."""
    before = resident_mib(server)
    for _ in range(3):
        response = infer(server, model, [text_input(["a"] * 100_000)])
        assert_error(
            response,
            "the request holds 100000 texts; this model takes at most 256 per request",
            "max_texts_per_request",
        )
    assert resident_mib(server) - before < 100, (before, resident_mib(server))
    at_the_limit = infer(server, model, [text_input(["a"] * 256)])
    assert at_the_limit.status_code == 200, at_the_limit.text[:500]
    assert server.is_healthy()


def test_token_ids_count_as_sequences_too(server):
    rows = [[101, 1000, 102]] * 257
    response = infer(
        server,
        "bert-base",
        [int64_input("input_ids", rows), int64_input("attention_mask", [[1, 1, 1]] * 257)],
    )
    assert_error(response, "holds 257 sequences of 'input_ids'", "max_texts_per_request")


def test_a_stop_string_that_starts_with_a_bracket_is_a_string(server):
    """`"stop": "[INST]"` (a chat-template marker) was refused as a malformed JSON list."""
    body = {
        "inputs": [text_input(["The weather today is"])],
        "parameters": {"do_sample": False, "max_new_tokens": 12},
    }
    plain = server.post("/v2/models/gpt2-small/infer", body)
    assert plain.status_code == 200, plain.text
    for marker in ["[INST]", "[1,2]", "[/INST]"]:
        body["parameters"]["stop"] = marker
        response = server.post("/v2/models/gpt2-small/infer", body)
        assert response.status_code == 200, (marker, response.text)
        assert response.json()["outputs"] == plain.json()["outputs"], marker
    body["parameters"] = {"do_sample": False, "max_new_tokens": 12, "stop_sequences": "[INST]"}
    assert_error(
        server.post("/v2/models/gpt2-small/infer", body),
        "'stop_sequences' must be a JSON list of strings",
    )


@pytest.fixture
def explicit(start_server):
    """A server in explicit mode with no model loaded."""
    return start_server(MODEL_REPOSITORY, args=["--model-control-mode=explicit"])


def generator_config(**parameters: str) -> dict:
    return {
        "name": "gpt2-small",
        "backend": "rust",
        "max_batch_size": 0,
        "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [{"name": "generated_text", "data_type": "TYPE_STRING", "dims": [-1]}],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {
            key: {"string_value": value}
            for key, value in {"task": "text-generation", **parameters}.items()
        },
    }


def test_settings_the_model_cannot_serve_fail_the_load(explicit):
    """max_sequence_length 1e12 once loaded, and then every request failed with a 500
    (ONNX Gather out of bounds); sentiment_score dims [-1, 5] on a 3-label model loaded
    too. The load runs one sequence of the longest length and compares the widths."""
    cases = [
        (
            "sentiment-classifier",
            classifier_config(
                "sentiment-classifier", task="sentiment-classifier", max_sequence_length="100000"
            ),
            "max_sequence_length is 100000, but a sequence of 100000 tokens fails on this model",
        ),
        (
            "gpt2-small",
            generator_config(max_sequence_length="5000"),
            "max_sequence_length (the context) is 5000, but a prompt of 4999 tokens fails",
        ),
    ]
    wide = classifier_config(
        "sentiment-classifier", task="sentiment-classifier", max_sequence_length="128"
    )
    wide["output"][0]["dims"] = [-1, 5]
    cases.append(
        (
            "sentiment-classifier",
            wide,
            "output 'sentiment_score' has dims [-1, 5], but the model's outputs are 3 wide",
        )
    )
    for model, config, expected in cases:
        started = time.monotonic()
        assert_error(load_model(explicit, model, config), expected)
        assert time.monotonic() - started < 30, expected
    assert load_model(explicit, "sentiment-classifier").status_code == 200
    assert infer(explicit, "sentiment-classifier", [text_input(["Fine."])]).status_code == 200
    longest = generator_config(max_sequence_length="128")
    assert load_model(explicit, "gpt2-small", longest).status_code == 200
