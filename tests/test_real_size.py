"""tools/bench/real_size.py: the random-weight models of real size that the benchmarks
build without torch. Built here at small dims (the same code), they load in a real
tritonserver through the shipped tasks and answer with the shapes of their config; at
the default dims they have BERT-base's and GPT-2's parameter counts."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import REPO_ROOT, infer, outputs_by_name, running_server, text_input, with_instances

sys.path.insert(0, str(REPO_ROOT / "tools" / "bench"))
import real_size  # noqa: E402

SMALL = dict(layers=2, hidden=96, heads=4, ffn=192, vocab=30522, positions=512)
# GPT-2's tokenizer needs its whole vocabulary; the rest is small.
SMALL_DECODER = dict(layers=2, hidden=32, heads=4, vocab=50257, positions=128)


def parameters(model: onnx.ModelProto) -> int:
    """Weights: float initializers other than scalar constants."""
    return sum(
        numpy_helper.to_array(t).size
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 0
    )


def expected_parameters(layers, hidden, heads, ffn, vocab, positions, head=False) -> int:
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    classifier = hidden * hidden + hidden + hidden * 3 + 3 if head else 0
    return embeddings + layers * layer + classifier


@pytest.mark.parametrize("task", ["feature-extraction", "sentiment-classifier"])
def test_the_graph_has_the_parameters_of_its_shape(task):
    model = real_size.build(task, **SMALL)
    assert parameters(model) == expected_parameters(**SMALL, head=task != "feature-extraction")
    # BERT-base: 110M parameters (109.5M without the pooler).
    base = expected_parameters(12, 768, 12, 3072, 30522, 512)
    assert 108e6 < base < 111e6


def decoder_parameters(layers, hidden, heads, vocab, positions) -> int:
    """Token and position embeddings (the output projection is tied to the first), then
    per layer attention (4 projections), the MLP (4x wide) and two layer norms, then the
    final layer norm."""
    return (vocab + positions) * hidden + layers * (12 * hidden * hidden + 13 * hidden) + 2 * hidden


def test_the_decoder_has_gpt2s_parameters():
    model = real_size.decoder(**SMALL_DECODER)
    assert parameters(model) == decoder_parameters(**SMALL_DECODER)
    # GPT-2 small: 124,439,808 parameters.
    assert decoder_parameters(12, 768, 12, 50257, 1024) == 124_439_808


def test_the_models_serve_through_the_shipped_tasks(tmp_path):
    args = type("Args", (), {**SMALL, "gpt2_vocab": SMALL_DECODER["vocab"],
                             "context": SMALL_DECODER["positions"]})
    for name, task in real_size.TASKS.items():
        real_size.write_model(tmp_path / "repository", name, task, args)
    with running_server(tmp_path / "repository", tmp_path / "tritonserver.log") as triton:
        response = triton.post("/v2/models/gpt2-base/infer", {
            "inputs": [text_input(["Once upon a time", "The weather today is very"])],
            "parameters": {"do_sample": False, "max_new_tokens": 12},
        })
        assert response.status_code == 200, response.text
        assert response.json()["parameters"]["generated_tokens"] <= 24
        texts = response.json()["outputs"][0]["data"]
        assert texts[0].startswith("Once upon a time") and texts[1].startswith("The weather")
        texts = ["A short one.", "A somewhat longer text for the encoder to read."]
        encoded = outputs_by_name(infer(triton, "encoder-base", [text_input(texts)]))
        batch, sequence, hidden = encoded["last_hidden_state"]["shape"]
        assert (batch, hidden) == (2, SMALL["hidden"]) and sequence > 5
        embedding = np.array(encoded["embedding"]["data"]).reshape(2, hidden)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
        classified = outputs_by_name(infer(triton, "classifier-base", [text_input(texts)]))
        assert classified["sentiment_score"]["shape"] == [2, 3]
        assert set(classified["sentiment_label"]["data"]) <= {"negative", "neutral", "positive"}


def vm_rss_mib(pid: int) -> float:
    status = (Path("/proc") / str(pid) / "status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_instances_of_a_version_share_its_weights(tmp_path):
    """Four instances of an encoder take far less memory than four copies of its
    weights: they share one (shared_weights.rs). Each server answers a few requests, then
    its resident memory is read."""
    dims = type("Args", (), dict(layers=4, hidden=384, heads=6, ffn=1536, vocab=30522,
                                 positions=512))
    built = real_size.write_model(tmp_path / "built", "encoder-base", "feature-extraction", dims)
    model_mib = (built / "1" / "model.onnx").stat().st_size / 2**20
    rss = {}
    for count in (1, 4):
        repository = tmp_path / f"count-{count}"
        shutil.copytree(built, repository / "encoder-base")
        config = repository / "encoder-base" / "config.pbtxt"
        config.write_text(with_instances(config.read_text(), count))
        with running_server(repository, tmp_path / f"tritonserver-{count}.log") as triton:
            for _ in range(8):
                response = infer(triton, "encoder-base", [text_input(["Shared weights."] * 4)])
                assert response.status_code == 200, response.text
            rss[count] = vm_rss_mib(triton.process.pid)
    extra = rss[4] - rss[1]
    # Without sharing, three more instances hold three more copies of the weights (3.8
    # times the model's size measured here); with it, their sessions' own buffers (1.2).
    assert extra < 2 * model_mib, (rss, model_mib)
