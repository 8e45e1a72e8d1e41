"""Regressions for what a hostile client found (issue 9): each case once gave a silent
wrong answer with a 200, and must now get a clear 400 that names the problem, while
the server keeps serving."""

from __future__ import annotations

import pytest

from conftest import assert_error, infer, int64_input, outputs_by_name, text_input


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
