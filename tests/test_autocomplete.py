"""Config auto-complete through a real tritonserver (its default): a model directory
whose config.pbtxt names only the backend and the task serves like the shipped model,
and /v2/models/<m>/config shows the completed inputs and outputs. Sizes come from the
ONNX graph, else from a Hugging Face config.json beside the model (id2label,
hidden_size), and the two must agree; label names from the config's parameters, else
config.json; a config that declares tensors is checked against the model, never
overridden; with --disable-auto-complete-config the minimal config is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import MODEL_REPOSITORY, infer, outputs_by_name, running_server, text_input

LABELS = ["negative", "neutral", "positive"]
LABELS_PARAMETER = 'parameters: { key: "labels", value: { string_value: "bad,meh,good" } }\n'
# name: (task, the model it copies, extra config lines, whether config.json is beside it)
MINIMAL = {
    "classifier-minimal": ("sentiment-classifier", "sentiment-classifier", "", True),
    "classifier-graph-only": ("sentiment-classifier", "sentiment-classifier", LABELS_PARAMETER, False),
    "encoder-minimal": ("feature-extraction", "bert-base", "", True),
    "encoder-graph-only": ("feature-extraction", "bert-base", "", False),
    "generator-minimal": ("text-generation", "gpt2-small", "", False),
    "stream-minimal": ("text-generation", "gpt2-small", "model_transaction_policy { decoupled: true }\n", False),
}


def minimal_config(task: str, extra: str = "") -> str:
    """The backend, the task, and the context of the tiny test models (128 positions; a
    real model's default, 512 or its tokenizer's truncation, is what it was trained for)."""
    return (f'backend: "rust"\n{extra}'
            f'parameters: {{ key: "task", value: {{ string_value: "{task}" }} }}\n'
            'parameters: { key: "max_sequence_length", value: { string_value: "128" } }\n')


def hf_config(source: str) -> dict:
    if source == "sentiment-classifier":
        return {"id2label": {str(i): label for i, label in enumerate(LABELS)}}
    return {"hidden_size": 64}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    for name, (task, source, extra, with_hf_config) in MINIMAL.items():
        version = root / name / "1"
        shutil.copytree(MODEL_REPOSITORY / source / "1", version)
        if with_hf_config:
            (version / "config.json").write_text(json.dumps(hf_config(source)))
        (root / name / "config.pbtxt").write_text(minimal_config(task, extra))
    # The shipped models they are compared with.
    for model in ("sentiment-classifier", "bert-base"):
        shutil.copytree(MODEL_REPOSITORY / model, root / model)
    return root


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    with running_server(repository, tmp_path_factory.mktemp("log") / "tritonserver.log") as server:
        yield server


def tensors(config: dict, key: str) -> dict[str, tuple[str, list[int]]]:
    return {t["name"]: (t["data_type"], [int(d) for d in t["dims"]]) for t in config[key]}


def test_the_completed_configs_show_the_tasks_tensors(triton):
    for name in ("classifier-minimal", "classifier-graph-only"):
        classifier = triton.get(f"/v2/models/{name}/config").json()
        assert tensors(classifier, "input") == {"text_input": ("TYPE_STRING", [-1])}
        assert tensors(classifier, "output") == {
            "sentiment_score": ("TYPE_FP32", [-1, 3]), "sentiment_label": ("TYPE_STRING", [-1])}
    for name in ("encoder-minimal", "encoder-graph-only"):
        encoder = triton.get(f"/v2/models/{name}/config").json()
        assert tensors(encoder, "output") == {
            "last_hidden_state": ("TYPE_FP32", [-1, -1, 64]), "embedding": ("TYPE_FP32", [-1, 64])}
    assert {t["name"]: t.get("optional", False) for t in encoder["input"]} == {
        "text_input": True, "input_ids": True, "attention_mask": True}
    stream = triton.get("/v2/models/stream-minimal/config").json()
    assert tensors(stream, "input")["text_input"] == ("TYPE_STRING", [1])
    assert "stream" in tensors(stream, "input") and "text_output" in tensors(stream, "output")
    generator = triton.get("/v2/models/generator-minimal/config").json()
    assert tensors(generator, "output")["generated_text"] == ("TYPE_STRING", [-1])


def test_minimal_models_answer_like_the_shipped_ones(triton):
    texts = ["What a wonderful day!", "Not great."]
    ours = outputs_by_name(infer(triton, "classifier-minimal/versions/1", [text_input(texts)]))
    shipped = outputs_by_name(infer(triton, "sentiment-classifier/versions/1", [text_input(texts)]))
    assert ours["sentiment_score"]["data"] == pytest.approx(shipped["sentiment_score"]["data"])
    # The label names come from config.json's id2label, else from the labels parameter.
    assert set(ours["sentiment_label"]["data"]) <= set(LABELS)
    graph_only = outputs_by_name(
        infer(triton, "classifier-graph-only/versions/1", [text_input(texts)]))
    assert graph_only["sentiment_score"]["data"] == pytest.approx(shipped["sentiment_score"]["data"])
    assert set(graph_only["sentiment_label"]["data"]) <= {"bad", "meh", "good"}
    ours = outputs_by_name(infer(triton, "encoder-minimal/versions/1", [text_input(texts)], ["embedding"]))
    shipped = outputs_by_name(infer(triton, "bert-base/versions/1", [text_input(texts)], ["embedding"]))
    assert ours["embedding"]["data"] == pytest.approx(shipped["embedding"]["data"], abs=1e-6)
    body = {"inputs": [text_input(["Once upon a time"])],
            "parameters": {"do_sample": False, "max_new_tokens": 5}}
    response = triton.post("/v2/models/generator-minimal/versions/1/infer", body)
    assert response.status_code == 200, response.text
    assert outputs_by_name(response)["generated_text"]["data"][0].startswith("Once upon a time")


def test_sizes_that_do_not_fit_the_model_fail_its_load_clearly(tmp_path):
    """Completed or written, the tensors are checked against the model: four labels in
    config.json for a 3-class graph, or a config that declares 5 classes (and is left as
    written, not completed), each fail the load with a message that says so."""
    repository = tmp_path / "repository"
    for name in ("four-labels", "declares-five"):
        shutil.copytree(MODEL_REPOSITORY / "sentiment-classifier" / "1", repository / name / "1")
    (repository / "four-labels" / "1" / "config.json").write_text(json.dumps(
        {"id2label": {str(i): f"l{i}" for i in range(4)}}))
    (repository / "four-labels" / "config.pbtxt").write_text(minimal_config("sentiment-classifier"))
    (repository / "declares-five" / "config.pbtxt").write_text(
        minimal_config("sentiment-classifier")
        + 'input [ { name: "text_input", data_type: TYPE_STRING, dims: [ -1 ] } ]\n'
        + 'output [ { name: "sentiment_score", data_type: TYPE_FP32, dims: [ -1, 5 ] } ]\n')
    with running_server(repository, tmp_path / "tritonserver.log",
                        args=["--exit-on-error=false", "--strict-readiness=false"]) as triton:
        reasons = {e["name"]: (e["state"], e.get("reason", ""))
                   for e in triton.post("/v2/repository/index", {}).json()}
    expected = {
        "four-labels": "model.onnx's output 'logits' is 3 wide, but config.json says 4 (id2label)",
        "declares-five": "has dims [-1, 5], but the model's outputs are 3 wide",
    }
    for name, message in expected.items():
        state, reason = reasons[name]
        assert state == "UNAVAILABLE", (name, reason)
        assert message in reason, (name, reason)


def test_without_auto_complete_a_minimal_config_is_refused(tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(MODEL_REPOSITORY / "gpt2-small" / "1", repository / "bare" / "1")
    (repository / "bare" / "config.pbtxt").write_text(minimal_config("text-generation"))
    args = ["--disable-auto-complete-config", "--exit-on-error=false", "--strict-readiness=false"]
    with running_server(repository, tmp_path / "tritonserver.log", args=args) as triton:
        (entry,) = triton.post("/v2/repository/index", {}).json()
        assert entry["state"] == "UNAVAILABLE", entry
        assert "text_input" in entry["reason"], entry
