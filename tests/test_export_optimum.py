"""The whole real-model export, offline: Hugging Face sources -> optimum -> served answers.

tools/export/make_tiny_sources.py writes `save_pretrained` directories of the test models
(version 1's weights and tokenizers, as the hub would serve a model); export_models.py
exports each with optimum, checks it against PyTorch and lays it out; a real tritonserver
serves the result, which must answer like tests/reference/ for version 1.

It needs torch, transformers and optimum (tools/export/requirements.txt, about 3.4 GB), which
CI does not install, so it runs only where TRITON_RUST_EXPORT_PYTHON names a Python that has
them: `bash scripts/check-export.sh` makes that venv and runs this file.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import (
    REPO_ROOT,
    assert_greedy_reference,
    infer,
    load_reference,
    outputs_by_name,
    running_server,
    text_input,
)

EXPORT_PYTHON = os.environ.get("TRITON_RUST_EXPORT_PYTHON")
EXPORT_TOOLS = REPO_ROOT / "tools" / "export"
CLASSIFIER, ENCODER, DECODER = "sentiment-classifier", "bert-base", "gpt2-small"
MODELS = (CLASSIFIER, ENCODER, DECODER)

pytestmark = pytest.mark.skipif(
    not EXPORT_PYTHON,
    reason="needs TRITON_RUST_EXPORT_PYTHON, a Python with tools/export/requirements.txt "
    "(bash scripts/check-export.sh)",
)


def run_tool(*args: object) -> str:
    done = subprocess.run(
        [EXPORT_PYTHON, *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """The exported repository and what the export printed, per model."""
    root = tmp_path_factory.mktemp("optimum-export")
    run_tool(EXPORT_TOOLS / "make_tiny_sources.py", root / "sources")
    repository = root / "repository"
    printed = {
        model: run_tool(
            EXPORT_TOOLS / "export_models.py",
            model,
            "--source",
            root / "sources" / model,
            "--repository",
            repository,
        )
        for model in MODELS
    }
    return {"root": root, "repository": repository, "printed": printed}


@pytest.fixture(scope="module")
def exported_server(exports):
    with running_server(exports["repository"], exports["root"] / "tritonserver.log") as triton:
        yield triton


@pytest.mark.parametrize("model", MODELS)
def test_export_checks_the_graph_against_pytorch_and_records_optimum(exports, model):
    assert f"{model}: onnxruntime matches PyTorch" in exports["printed"][model]
    version_dir = exports["repository"] / model / "1"
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == str((exports["root"] / "sources" / model).resolve())
    assert {"torch", "transformers", "optimum", "optimum-onnx"} <= set(manifest["tools"])
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "tokenizer.json",
    ]


def test_exported_classifier_answers_like_the_reference(exported_server):
    cases = load_reference(CLASSIFIER)["versions"]["1"]
    response = infer(exported_server, CLASSIFIER, [text_input([c["text"] for c in cases])])
    assert response.status_code == 200, response.text
    outputs = outputs_by_name(response)
    assert outputs["sentiment_label"]["data"] == [c["label"] for c in cases]
    scores = np.array(outputs["sentiment_score"]["data"]).reshape(
        outputs["sentiment_score"]["shape"]
    )
    np.testing.assert_allclose(scores, [c["probabilities"] for c in cases], rtol=0, atol=1e-4)


def test_exported_encoder_answers_like_the_reference(exported_server):
    cases = load_reference(ENCODER)["versions"]["1"]
    response = infer(
        exported_server, ENCODER, [text_input([c["text"] for c in cases])], outputs=["embedding"]
    )
    assert response.status_code == 200, response.text
    embedding = outputs_by_name(response)["embedding"]
    np.testing.assert_allclose(
        np.array(embedding["data"]).reshape(embedding["shape"]),
        [c["embedding"] for c in cases],
        rtol=0,
        atol=1e-4,
    )


def test_exported_decoder_generates_the_reference_greedy_text(exported_server):
    assert_greedy_reference(exported_server, DECODER, "1")

