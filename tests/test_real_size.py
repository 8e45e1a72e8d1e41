"""tools/bench/real_size.py: the random-weight models of real size that the benchmarks
build without torch. Built here at small dims (the same code), they load in a real
tritonserver through the shipped tasks and answer with the shapes of their config; at
the default dims they have BERT-base's parameter count."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import REPO_ROOT, infer, outputs_by_name, running_server, text_input

sys.path.insert(0, str(REPO_ROOT / "tools" / "bench"))
import real_size  # noqa: E402

SMALL = dict(layers=2, hidden=96, heads=4, ffn=192, vocab=30522, positions=512)


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


def test_the_models_serve_through_the_shipped_tasks(tmp_path):
    args = type("Args", (), SMALL)
    for name, task in [("encoder-base", "feature-extraction"), ("classifier-base", "sentiment-classifier")]:
        real_size.write_model(tmp_path / "repository", name, task, args)
    with running_server(tmp_path / "repository", tmp_path / "tritonserver.log") as triton:
        texts = ["A short one.", "A somewhat longer text for the encoder to read."]
        encoded = outputs_by_name(infer(triton, "encoder-base", [text_input(texts)]))
        batch, sequence, hidden = encoded["last_hidden_state"]["shape"]
        assert (batch, hidden) == (2, SMALL["hidden"]) and sequence > 5
        embedding = np.array(encoded["embedding"]["data"]).reshape(2, hidden)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
        classified = outputs_by_name(infer(triton, "classifier-base", [text_input(texts)]))
        assert classified["sentiment_score"]["shape"] == [2, 3]
        assert set(classified["sentiment_label"]["data"]) <= {"negative", "neutral", "positive"}
