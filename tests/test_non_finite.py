"""A model whose outputs turn NaN or infinite (broken weights, a float16 export that
overflows) gets an error naming the element or prompt, never a 200 with scores, a label,
an embedding or a text made from them; every other request, and every other row of the
same execution or running batch, is answered as by the intact model. A canary of such a
version is rolled back on its errors.

The broken models are copies of the bundled ones whose graph turns NaN or +inf for the
sequences holding one token (tests/model_edits.py)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import (
    MODEL_REPOSITORY,
    assert_error,
    canary_state,
    copy_models,
    infer,
    load_model,
    outputs_by_name,
    running_server,
    text_input,
)
from model_edits import poison_file, poisoned_copy, vocabulary

NAN, INF = float("nan"), float("inf")
# Tokenized as '^' (BERT: [UNK]) and '~' by the GPT-2-style tokenizers, and 'street'
# by BERT's; none of them in CLEAN or in a warm-up.
NAN_TEXT = "Not a good sign ^ at all."
INF_TEXT = "Waves ~ everywhere."
BERT_INF_TEXT = "The street was quiet."
CLEAN = ["What a wonderful day!", "The food was cold and late.", "It was fine, I guess."]
NOT_FINITE = "not finite (NaN or infinity)"


def byte_level_poison(model: str) -> dict[int, float]:
    words = vocabulary(MODEL_REPOSITORY / model / "1")
    return {words["^"]: NAN, words["~"]: INF}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A server with the intact models and a broken copy of each one's version 1,
    `<model>-broken`."""
    repository = copy_models(tmp_path_factory.mktemp("repository"), "sentiment-classifier",
                             "bert-base", "gpt2-small", "gpt2-small-stream")
    bert = vocabulary(MODEL_REPOSITORY / "bert-base" / "1")
    for model, output, tokens in [
        ("sentiment-classifier", "logits", byte_level_poison("sentiment-classifier")),
        ("bert-base", "last_hidden_state", {bert["[UNK]"]: NAN, bert["street"]: INF}),
        ("gpt2-small", "logits", byte_level_poison("gpt2-small")),
        ("gpt2-small-stream", "logits", byte_level_poison("gpt2-small-stream")),
    ]:
        poisoned_copy(MODEL_REPOSITORY / model, repository / f"{model}-broken",
                      f"{model}-broken", output, tokens)
    with running_server(repository, tmp_path_factory.mktemp("broken") / "tritonserver.log") as triton:
        yield triton


def concurrently(calls):
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda call: call(), calls))


@pytest.mark.parametrize("model, output, inf_text", [
    ("sentiment-classifier", "sentiment_score", INF_TEXT),
    ("bert-base", "embedding", BERT_INF_TEXT),
])
def test_an_encoder_fails_the_request_with_the_broken_element_and_answers_the_rest(
    broken, model, output, inf_text
):
    for texts, element in [([CLEAN[0], NAN_TEXT, CLEAN[1]], 1), ([inf_text], 0)]:
        response = infer(broken, f"{model}-broken", [text_input(texts)])
        assert_error(response, f"for element {element} are {NOT_FINITE}", status=500)

    def intact(text):
        response = broken.post(f"/v2/models/{model}/versions/1/infer",
                               {"inputs": [text_input([text])]})
        assert response.status_code == 200, response.text
        return outputs_by_name(response)

    expected = {text: intact(text) for text in CLEAN}
    # Mixed with broken requests, so that some executions hold both (dynamic batching).
    texts = [CLEAN[i % 3] if i % 2 else [NAN_TEXT, inf_text][i % 4 // 2] for i in range(48)]
    answers = concurrently(
        [lambda text=text: infer(broken, f"{model}-broken", [text_input([text])]) for text in texts]
    )
    for text, response in zip(texts, answers):
        if text in CLEAN:
            assert response.status_code == 200, response.text
            got = outputs_by_name(response)
            assert np.allclose(got[output]["data"], expected[text][output]["data"], atol=1e-5)
            if model == "sentiment-classifier":
                assert got["sentiment_label"]["data"] == expected[text]["sentiment_label"]["data"]
        else:
            assert_error(response, f"for element 0 are {NOT_FINITE}", status=500)
    assert broken.is_healthy()


SETTINGS = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "seed": 7},
    "top-k sampling": {"do_sample": True, "top_k": 20, "seed": 7},
    "greedy with a repetition penalty": {"do_sample": False, "repetition_penalty": 1.3},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_a_generation_fails_the_request_with_the_broken_prompt_and_the_batch_runs_on(
    broken, settings
):
    """Every token chooser (greedy, plain and sorted sampling) refuses a row whose
    logits are not finite; concurrent greedy generations in the same running batch
    still give the intact model's text."""

    def generate(model, prompts, parameters):
        body = {"inputs": [text_input(prompts)], "parameters": dict(parameters, max_new_tokens=20)}
        return broken.post(f"/v2/models/{model}/infer", body)

    greedy = SETTINGS["greedy"]
    expected = {}
    for prompt in CLEAN:
        response = generate("gpt2-small/versions/1", [prompt], greedy)
        assert response.status_code == 200, response.text
        expected[prompt] = outputs_by_name(response)["generated_text"]["data"]
    calls = [lambda: generate("gpt2-small-broken", [CLEAN[0], NAN_TEXT], settings),
             lambda: generate("gpt2-small-broken", [INF_TEXT], settings)]
    calls += [lambda prompt=prompt: generate("gpt2-small-broken", [prompt], greedy)
              for prompt in CLEAN * 3]
    nan_answer, inf_answer, *clean_answers = concurrently(calls)
    assert_error(nan_answer, f"logits for prompt 1 (choosing its new token 1) are {NOT_FINITE}",
                 status=500)
    assert_error(inf_answer, f"logits for prompt 0 (choosing its new token 1) are {NOT_FINITE}",
                 status=500)
    for prompt, response in zip(CLEAN * 3, clean_answers):
        assert response.status_code == 200, response.text
        assert outputs_by_name(response)["generated_text"]["data"] == expected[prompt]
    assert broken.is_healthy()


def test_a_stream_ends_with_the_error_instead_of_garbage(broken):
    path = "/v2/models/gpt2-small-stream-broken/generate_stream"
    response = broken.post(path, {"text_input": NAN_TEXT, "parameters": {"max_new_tokens": 20}})
    events = [json.loads(line.removeprefix("data: "))
              for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and all("text_output" not in event for event in events), events
    assert NOT_FINITE in events[-1]["error"], events
    # Greedy: the shipped stream samples, and may draw the poisoned token (see below).
    clean = {"text_input": CLEAN[0], "parameters": {"do_sample": False, "max_new_tokens": 20}}
    response = broken.post(path, clean)
    assert response.status_code == 200, response.text
    assert "error" not in response.text, response.text


def test_a_generated_token_that_breaks_the_model_ends_its_request_there(broken):
    """A clean prompt whose sampled continuation draws the poisoned token: the step
    after it has NaN logits, and the error names that token's place."""
    body = {"inputs": [text_input([CLEAN[0]])], "parameters": {"max_new_tokens": 40}}
    for seed in range(200):
        body["parameters"]["seed"] = seed
        response = broken.post("/v2/models/gpt2-small-broken/infer", body)
        if response.status_code != 200:
            message = assert_error(response, NOT_FINITE, status=500)
            place = int(re.search(r"choosing its new token (\d+)\)", message).group(1))
            assert place > 1, message
            break
    else:
        pytest.fail("no seed in 200 drew the poisoned token")
    assert broken.is_healthy()


def test_a_warm_up_sample_that_hits_it_fails_the_load(tmp_path, start_server):
    repository = tmp_path / "repository"
    model = poisoned_copy(MODEL_REPOSITORY / "sentiment-classifier",
                          repository / "sentiment-classifier", "sentiment-classifier",
                          "logits", byte_level_poison("sentiment-classifier"), keep_warmup=True)
    texts = [CLEAN[0].encode(), NAN_TEXT.encode()]
    (model / "warmup" / "text_input.bin").write_bytes(
        b"".join(struct.pack("<I", len(text)) + text for text in texts))
    server = start_server(repository, args=["--model-control-mode=explicit"])
    response = load_model(server, "sentiment-classifier")
    assert_error(response, "failed to run warmup sample 'two_texts'",
                 f"logits for element 1 are {NOT_FINITE}")


# --- a canary of a broken version ------------------------------------------------------

ROUTER = "sentiment-classifier-ab"


def test_a_canary_whose_version_breaks_on_some_inputs_is_rolled_back(tmp_path):
    """Version 2 is version 1 broken on texts with '^' (a third of the traffic): its
    errors roll it back, and then every request is answered by version 1."""
    repository = copy_models(tmp_path / "repository", "sentiment-classifier", ROUTER)
    versions = repository / "sentiment-classifier"
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(versions / "1" / name, versions / "2" / name)
    poison_file(versions / "2" / "model.onnx", "logits", byte_level_poison("sentiment-classifier"))
    config = repository / ROUTER / "config.pbtxt"
    config.write_text(config.read_text() + "".join(
        f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
        for key, value in [("canary_steps", "20,50,100"), ("canary_min_samples", "200"),
                           # Only the errors may roll it back (its failures answer sooner).
                           ("latency_regression_percent", "1000")]))
    with running_server(repository, tmp_path / "tritonserver.log") as server:
        assert canary_state(server, ROUTER) == {"progressing": 1, "promoted": 0, "rolled_back": 0}
        texts = [CLEAN[0], NAN_TEXT, CLEAN[1]]
        deadline = time.monotonic() + 120
        sent = 0
        while canary_state(server, ROUTER)["rolled_back"] != 1:
            assert time.monotonic() < deadline, (sent, canary_state(server, ROUTER))
            response = infer(server, ROUTER, [text_input([texts[sent % 3]])])
            served = response.json().get("parameters", {}).get("ab_model_version")
            assert response.status_code == 200 or texts[sent % 3] == NAN_TEXT, response.text
            if response.status_code != 200:
                assert NOT_FINITE in response.text, response.text
            assert served in ("1", "2", None), response.text
            sent += 1
        assert "RolledBack: the challenger is worse (errors" in server.log()
        for text in texts * 20:
            response = infer(server, ROUTER, [text_input([text])])
            assert response.status_code == 200, response.text
            assert response.json()["parameters"]["ab_model_version"] == "1"
