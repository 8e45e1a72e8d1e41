"""Length-aware batching of the encoders, through a real tritonserver: texts of very
different lengths in one execution run as separate ONNX Runtime batches, so padding does
not dominate (counted by the triton_rust_encoder_* metrics), and every text's answer
equals its answer alone; `group_by_length: false` runs one batch padded to the longest
text, and a request for `last_hidden_state` (whose padded positions are part of the
answer) always does."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL_REPOSITORY, copy_models, infer, outputs_by_name, running_server, text_input

CLASSIFIER, ENCODER = "sentiment-classifier", "bert-base"
SHORT = ["Fine.", "Not good at all.", "What a day!", "Meh."]
LONG = [" ".join(["a long and winding sentence"] * 30), " ".join(["another long text"] * 40)]
MIXED = [SHORT[0], LONG[0], SHORT[1], SHORT[2], LONG[1], SHORT[3]]
PER_TEXT_OUTPUT = {CLASSIFIER: "sentiment_score", ENCODER: "embedding"}


def token_counters(triton, model: str) -> dict[str, float]:
    """The encoder token counters of the model's served version (the latest)."""
    text = requests.get(triton.metrics_url, timeout=10).text
    counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("triton_rust_encoder_") and sample.labels["model"] == model:
                if sample.labels["version"] == "2":
                    counters[sample.name.removeprefix("triton_rust_encoder_")] = sample.value
    return counters


def run_counted(triton, model: str, texts: list[str], outputs: list[str]):
    """One request's outputs and the counters' growth while it ran."""
    before = token_counters(triton, model)
    response = infer(triton, model, [text_input(texts)], outputs)
    assert response.status_code == 200, response.text
    after = token_counters(triton, model)
    grown = {key: after[key] - before.get(key, 0.0) for key in after}
    return outputs_by_name(response), grown


def alone(triton, model: str, output: str) -> np.ndarray:
    rows = []
    for text in MIXED:
        response = infer(triton, model, [text_input([text])], [output])
        assert response.status_code == 200, response.text
        rows.append(np.array(outputs_by_name(response)[output]["data"], dtype=np.float32))
    return np.stack(rows)


@pytest.fixture(scope="module")
def grouped_and_padded(tmp_path_factory):
    """A server with the shipped classifier and encoder, and copies of them named
    `<model>-padded` with `group_by_length: false`."""
    repository = copy_models(tmp_path_factory.mktemp("repository"), CLASSIFIER, ENCODER)
    for model in (CLASSIFIER, ENCODER):
        padded = repository / f"{model}-padded"
        shutil.copytree(MODEL_REPOSITORY / model, padded)
        config = (padded / "config.pbtxt").read_text()
        config = config.replace(f'name: "{model}"', f'name: "{model}-padded"')
        config += 'parameters: { key: "group_by_length", value: { string_value: "false" } }\n'
        (padded / "config.pbtxt").write_text(config)
    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    with running_server(repository, log) as triton:
        yield triton


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER])
def test_mixed_lengths_run_apart_with_the_same_answers(grouped_and_padded, model):
    triton = grouped_and_padded
    output = PER_TEXT_OUTPUT[model]
    expected = alone(triton, model, output)
    grouped, grown = run_counted(triton, model, MIXED, [output])
    padded, padded_grown = run_counted(triton, f"{model}-padded", MIXED, [output])
    for result in (grouped, padded):
        values = np.array(result[output]["data"], dtype=np.float32).reshape(expected.shape)
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)
    # The short texts and the long ones ran as two batches...
    assert grown["runs_total"] == 2 and padded_grown["runs_total"] == 1
    assert grown["tokens_total"] == padded_grown["tokens_total"]
    # ...so the tokens fed are far fewer than six rows padded to the longest.
    overhead = grown["fed_tokens_total"] / grown["tokens_total"]
    padded_overhead = padded_grown["fed_tokens_total"] / padded_grown["tokens_total"]
    assert overhead < 1.2 < 2 < padded_overhead, (overhead, padded_overhead)


def test_last_hidden_state_keeps_one_padded_batch(grouped_and_padded):
    triton = grouped_and_padded
    grouped, grown = run_counted(triton, ENCODER, MIXED, ["last_hidden_state", "embedding"])
    padded, _ = run_counted(triton, f"{ENCODER}-padded", MIXED, ["last_hidden_state", "embedding"])
    assert grown["runs_total"] == 1
    for name in ("last_hidden_state", "embedding"):
        assert grouped[name]["shape"] == padded[name]["shape"]
        np.testing.assert_allclose(grouped[name]["data"], padded[name]["data"], rtol=1e-5, atol=1e-6)
