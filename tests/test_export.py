"""The real-model export tool's layout step (tools/export/), on the committed test models.

The export step itself (torch + transformers, hub downloads) cannot run here; what it
hands to the layout step is a directory with model.onnx, tokenizer.json and the Hugging
Face config.json. The committed test models play that part, with a config.json written
here (its `id2label` names the classes unlike the example config does, so the served
labels prove where they came from). The laid-out repository is then served by a real
tritonserver, which runs each model's warm-up through the backend at load, and compared
with tests/reference/.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import serialize_byte_tensor
from conftest import (
    MODEL_REPOSITORY,
    REPO_ROOT,
    assert_greedy_reference,
    infer,
    load_reference,
    outputs_by_name,
    repository_index,
    running_server,
    text_input,
)

sys.path.insert(0, str(REPO_ROOT / "tools" / "export"))

import repository_layout as layout  # noqa: E402
from export_models import MODELS  # noqa: E402

EXPORT_SCRIPT = REPO_ROOT / "tools" / "export" / "export_models.py"
CLASSIFIER, ENCODER, DECODER = "sentiment-classifier", "bert-base", "gpt2-small"

# The classifier's classes in reference order (negative, neutral, positive), renamed; the
# quote and the accents must survive config.pbtxt escaping and the backend's parsing.
LABELS = ["négatif", 'so-so "meh"', "positif"]

# What transformers writes into config.json for the committed models (only the fields
# the layout reads, and the ones that must not confuse it).
HF_CONFIGS = {
    CLASSIFIER: {
        "model_type": "roberta",
        "max_position_embeddings": 130,
        "pad_token_id": 1,
        "hidden_size": 64,
        "id2label": {str(index): name for index, name in enumerate(LABELS)},
    },
    ENCODER: {
        "model_type": "bert",
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "hidden_size": 64,
    },
    DECODER: {
        "model_type": "gpt2",
        "n_positions": 128,
        "n_embd": 64,
        "eos_token_id": 0,
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    },
}

PROVENANCE = layout.Provenance(
    "example/hub-id", "0123456789abcdef", {"python": "3", "torch": "2.15.0"}
)


def make_export(
    directory: Path, model: str, version: str = "1", hf_config: dict | None = None
) -> Path:
    """An export directory as the export step leaves it, from a committed model version."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in layout.EXPORTED_FILES:
        shutil.copyfile(MODEL_REPOSITORY / model / version / name, directory / name)
    config = HF_CONFIGS[model] if hf_config is None else hf_config
    (directory / layout.HF_CONFIG).write_text(
        json.dumps(config, ensure_ascii=False), encoding="utf-8"
    )
    return directory


def install(
    tmp_path: Path,
    model: str,
    version: int = 1,
    source_version: str = "1",
    hf_config: dict | None = None,
    force: bool = False,
    serving: layout.Serving = layout.Serving(),
) -> Path:
    """Lays out a committed model version into tmp_path/repository; returns the version dir."""
    exported = make_export(
        Path(tempfile.mkdtemp(prefix="export-", dir=tmp_path)), model, source_version, hf_config
    )
    target = layout.Target(tmp_path / "repository", model, version)
    return layout.install(exported, target, MODELS[model].task, PROVENANCE, force, serving)


def read_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def pbtxt_parameters(text: str) -> dict[str, str]:
    """The string parameters of a config.pbtxt, unescaped."""
    string = r'"((?:[^"\\]|\\.)*)"'
    pattern = rf"parameters: \{{ key: {string}, value: \{{ string_value: {string} \}} \}}"
    return {unescape(k): unescape(v) for k, v in re.findall(pattern, text)}


def unescape(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal)


def pbtxt_body(text: str) -> list[str]:
    """The lines of a config.pbtxt other than comments, blank lines and parameters."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "parameters:"))]


# --- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER, DECODER])
def test_layout_writes_the_version_files_config_and_manifest(tmp_path, model):
    version_dir = install(tmp_path, model, version=3)
    repository = tmp_path / "repository"
    assert version_dir == repository / model / "3"
    # Nothing else: no staging directory is left behind.
    assert files_under(repository) == {
        f"{model}/config.pbtxt",
        f"{model}/warmup/text_input.bin",
        f"{model}/3/model.onnx",
        f"{model}/3/tokenizer.json",
        f"{model}/3/manifest.json",
    }
    for name in layout.EXPORTED_FILES:
        source = MODEL_REPOSITORY / model / "1" / name
        assert (version_dir / name).read_bytes() == source.read_bytes()
    # Readable by a server running as another user (the container image's UID 10001).
    assert stat.S_IMODE(version_dir.stat().st_mode) == 0o755


def test_manifest_records_source_revision_hashes_and_date(tmp_path):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    version_dir = install(tmp_path, CLASSIFIER, version=2)
    after = datetime.now(timezone.utc)
    manifest = read_manifest(version_dir)
    assert manifest["model"] == CLASSIFIER and manifest["version"] == 2
    assert manifest["task"] == "sentiment-classifier"
    assert manifest["source"] == PROVENANCE.source and manifest["revision"] == PROVENANCE.revision
    assert manifest["tools"] == PROVENANCE.tools
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["exported_at"]), manifest[
        "exported_at"
    ]
    exported_at = datetime.fromisoformat(manifest["exported_at"].replace("Z", "+00:00"))
    assert before <= exported_at <= after
    # The version's own files; config.pbtxt and warmup/ belong to the model (all versions).
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert entry == {
            "sha256": sha256(version_dir / name),
            "size": (version_dir / name).stat().st_size,
        }


@pytest.mark.parametrize(
    "model, changed",
    [
        (CLASSIFIER, {"labels": ",".join(LABELS)}),
        (ENCODER, {}),
        (DECODER, {"eos_token": "<|endoftext|>"}),
    ],
)
def test_config_is_the_example_config_with_this_exports_values(tmp_path, model, changed):
    """Same inputs, outputs (sizes from config.json), instances, parameters and warm-up
    sample as the committed example config (which serves all versions, for the A/B
    routers); only the labels and the explicit end-of-text token differ."""
    install(tmp_path, model, serving=layout.Serving(versions=None))
    written = (tmp_path / "repository" / model / "config.pbtxt").read_text(encoding="utf-8")
    example = (MODEL_REPOSITORY / model / "config.pbtxt").read_text(encoding="utf-8")
    assert pbtxt_body(written) == pbtxt_body(example)
    assert pbtxt_parameters(written) == {**pbtxt_parameters(example), **changed}


@pytest.mark.parametrize("versions_served, policy", [
    (1, "version_policy: { latest { num_versions: 1 } }"),
    (3, "version_policy: { latest { num_versions: 3 } }"),
    (None, "version_policy: { all { } }"),
])
def test_config_serves_the_newest_version_unless_asked(tmp_path, versions_served, policy):
    """Every loaded version holds its own weights: by default only the newest one is
    loaded, more on request (an A/B router over versions needs them)."""
    install(tmp_path, ENCODER, serving=layout.Serving(versions=versions_served))
    written = (tmp_path / "repository" / ENCODER / "config.pbtxt").read_text(encoding="utf-8")
    assert [line for line in written.splitlines() if line.startswith("version_policy")] == [policy]
    with pytest.raises(layout.LayoutError, match="at least 1"):
        layout.version_policy(0)


def test_the_default_export_serves_only_the_newest_version(tmp_path):
    repository = tmp_path / "repository"
    for version in ("1", "2"):
        exported = make_export(tmp_path / f"export-{version}", CLASSIFIER, version)
        done = run_export(CLASSIFIER, "--exported", str(exported), "--repository",
                          str(repository), "--version", version)
        assert done.returncode == 0, done.stderr
    with running_server(repository, tmp_path / "tritonserver.log") as triton:
        ready = {entry["version"] for entry in repository_index(triton)[CLASSIFIER]
                 if entry.get("state") == "READY"}
        assert ready == {"2"}, repository_index(triton)


def parsed_config(text: str):
    """A config.pbtxt parsed with Triton's own ModelConfig schema (tritonclient's copy of
    model_config.proto): an unknown field or a malformed value fails here."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER, DECODER])
@pytest.mark.parametrize("serving", [
    layout.Serving(), layout.Serving(versions=None), layout.Serving(versions=2, gpu=True),
])
def test_rendered_configs_are_valid_model_configs(model, serving):
    """The one renderer of config.pbtxt, checked against Triton's ModelConfig: the same
    tensors, warm-up and queue as the committed example, the version policy and instance
    group asked for."""
    tokenizer = json.loads((MODEL_REPOSITORY / model / "1" / "tokenizer.json").read_text())
    rendered = parsed_config(layout.render_config(model, MODELS[model].task, HF_CONFIGS[model],
                                                  tokenizer, serving))
    example = parsed_config((MODEL_REPOSITORY / model / "config.pbtxt").read_text())
    assert (rendered.name, rendered.backend, rendered.max_batch_size) == (model, "rust", 0)
    for field in ("input", "output", "model_warmup", "dynamic_batching"):
        assert getattr(rendered, field) == getattr(example, field), field
    if serving.versions is None:
        assert rendered.version_policy.WhichOneof("policy_choice") == "all"
    else:
        assert rendered.version_policy.latest.num_versions == serving.versions
    (group,) = rendered.instance_group
    expected_kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if serving.gpu else (
        example.instance_group[0].kind)
    assert group.kind == expected_kind


@pytest.mark.parametrize("model", [CLASSIFIER, DECODER])
def test_gpu_exports_run_one_instance_per_gpu(tmp_path, model):
    """--instance-kind gpu: one KIND_GPU instance instead of the example's CPU ones; the
    rest of the config is the same."""
    install(tmp_path, model, serving=layout.Serving(gpu=True))
    gpu = (tmp_path / "repository" / model / "config.pbtxt").read_text(encoding="utf-8")
    cpu = layout.render_config(model, MODELS[model].task, HF_CONFIGS[model],
                               json.loads((MODEL_REPOSITORY / model / "1" / "tokenizer.json").read_text()))
    groups = [line for line in gpu.splitlines() if line.startswith("instance_group")]
    assert groups == ["instance_group [ { count: 1, kind: KIND_GPU } ]"]
    assert [l for l in pbtxt_body(gpu) if not l.startswith("instance_group")] == [
        l for l in pbtxt_body(cpu) if not l.startswith("instance_group")]


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER, DECODER])
def test_warmup_file_is_the_example_warmup_file(tmp_path, model):
    """The file the config's model_warmup sample names, with the example's texts, serialized
    as a BYTES tensor (the example config's comment and tests/test_lifecycle.py say how)."""
    install(tmp_path, model)
    model_dir = tmp_path / "repository" / model
    config = (model_dir / "config.pbtxt").read_text(encoding="utf-8")
    assert 'input_data_file: "text_input.bin"' in config
    written = model_dir / "warmup" / "text_input.bin"
    assert written.read_bytes() == (MODEL_REPOSITORY / model / "warmup" / written.name).read_bytes()
    assert stat.S_IMODE(written.stat().st_mode) & 0o444 == 0o444
    assert stat.S_IMODE(written.parent.stat().st_mode) & 0o555 == 0o555


def test_bytes_tensor_is_tritonclients_serialization():
    assert layout.bytes_tensor([]) == b""
    for texts in (["ab", "", "é"], ["What a wonderful day to warm up a model!", "Not great."]):
        expected = serialize_byte_tensor(np.array([t.encode() for t in texts], dtype=object))
        assert layout.bytes_tensor(texts) == expected.item()


def test_context_length_and_sizes_come_from_config_json(tmp_path):
    roberta = dict(
        HF_CONFIGS[CLASSIFIER], max_position_embeddings=514, id2label={"0": "bad", "1": "good"}
    )
    install(tmp_path, CLASSIFIER, hf_config=roberta)
    bert = dict(HF_CONFIGS[ENCODER], max_position_embeddings=512, hidden_size=768)
    install(tmp_path, ENCODER, hf_config=bert)
    classifier = (tmp_path / "repository" / CLASSIFIER / "config.pbtxt").read_text(encoding="utf-8")
    encoder = (tmp_path / "repository" / ENCODER / "config.pbtxt").read_text(encoding="utf-8")
    # RoBERTa's positions start after the padding index: 514 - (1 + 1) usable tokens.
    assert pbtxt_parameters(classifier)["max_sequence_length"] == "512"
    assert pbtxt_parameters(classifier)["labels"] == "bad,good"
    assert "dims: [ -1, 2 ]" in classifier
    assert pbtxt_parameters(encoder)["max_sequence_length"] == "512"
    assert "dims: [ -1, -1, 768 ]" in encoder and "dims: [ -1, 768 ]" in encoder


def test_an_existing_version_is_replaced_only_with_force(tmp_path):
    version_dir = install(tmp_path, ENCODER)
    before = {name: sha256(version_dir / name) for name in ("model.onnx", "manifest.json")}
    with pytest.raises(layout.LayoutError, match="--force"):
        install(tmp_path, ENCODER, source_version="2")
    assert {name: sha256(version_dir / name) for name in before} == before
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(".")]

    install(tmp_path, ENCODER, source_version="2", force=True)
    assert sha256(version_dir / "model.onnx") == sha256(
        MODEL_REPOSITORY / ENCODER / "2" / "model.onnx"
    )
    manifest = read_manifest(version_dir)
    assert manifest["files"]["model.onnx"]["sha256"] == sha256(version_dir / "model.onnx")


def test_a_differing_config_is_replaced_only_with_force(tmp_path):
    install(tmp_path, CLASSIFIER, version=1)
    config = tmp_path / "repository" / CLASSIFIER / "config.pbtxt"
    written = config.read_text(encoding="utf-8")
    # A second version with the same config.json shares the config.pbtxt as it is.
    install(tmp_path, CLASSIFIER, version=2, source_version="2")
    assert config.read_text(encoding="utf-8") == written

    relabelled = dict(HF_CONFIGS[CLASSIFIER], id2label={"0": "a", "1": "b", "2": "c"})
    with pytest.raises(layout.LayoutError, match="differs.*--force"):
        install(tmp_path, CLASSIFIER, version=3, hf_config=relabelled)
    assert config.read_text(encoding="utf-8") == written
    assert not (config.parent / "3").exists()

    install(tmp_path, CLASSIFIER, version=3, hf_config=relabelled, force=True)
    assert pbtxt_parameters(config.read_text(encoding="utf-8"))["labels"] == "a,b,c"


def test_a_differing_warmup_file_is_replaced_only_with_force(tmp_path):
    install(tmp_path, ENCODER, version=1)
    warmup = tmp_path / "repository" / ENCODER / "warmup" / "text_input.bin"
    written = warmup.read_bytes()
    # Local edits (other texts, same count) are kept: all versions share the file.
    edited = layout.bytes_tensor(["Domain text one.", "Domain text two."])
    warmup.write_bytes(edited)
    with pytest.raises(layout.LayoutError, match="text_input.bin differs.*--force"):
        install(tmp_path, ENCODER, version=2, source_version="2")
    assert warmup.read_bytes() == edited
    assert not (warmup.parent.parent / "2").exists()

    install(tmp_path, ENCODER, version=2, source_version="2", force=True)
    assert warmup.read_bytes() == written


def without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


@pytest.mark.parametrize(
    "model, hf_config, message",
    [
        (
            CLASSIFIER,
            dict(HF_CONFIGS[CLASSIFIER], id2label={"0": "bad", "1": "not bad, not good"}),
            "commas",
        ),
        (
            CLASSIFIER,
            dict(HF_CONFIGS[CLASSIFIER], id2label={"0": " bad", "1": "good"}),
            "surrounding spaces",
        ),
        (CLASSIFIER, dict(HF_CONFIGS[CLASSIFIER], id2label={"0": "bad", "2": "good"}), "0..n-1"),
        (
            CLASSIFIER,
            dict(HF_CONFIGS[CLASSIFIER], id2label={"0": "bad", "1": "go\nod"}),
            "control characters",
        ),
        (CLASSIFIER, without(HF_CONFIGS[CLASSIFIER], "id2label"), "id2label"),
        (ENCODER, without(HF_CONFIGS[ENCODER], "hidden_size"), "hidden_size"),
        (DECODER, dict(HF_CONFIGS[DECODER], eos_token_id=999999), "not in tokenizer.json"),
    ],
)
def test_exports_the_backend_could_not_serve_are_refused(tmp_path, model, hf_config, message):
    with pytest.raises(layout.LayoutError, match=message):
        install(tmp_path, model, hf_config=hf_config)
    assert not (tmp_path / "repository").exists()


def test_an_incomplete_export_is_refused(tmp_path):
    exported = make_export(tmp_path / "export", DECODER)
    (exported / "model.onnx").unlink()
    target = layout.Target(tmp_path / "repository", DECODER, 1)
    with pytest.raises(layout.LayoutError, match="lacks model.onnx"):
        layout.install(exported, target, "text-generation", PROVENANCE)
    assert not (tmp_path / "repository").exists()


# --- the command line, without torch ---------------------------------------------------


def run_export(*args: str) -> subprocess.CompletedProcess:
    """export_models.py in a Python where only the standard library can be imported."""
    blocked = ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy")
    runner = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); "
        f"sys.argv = [{str(EXPORT_SCRIPT)!r}, *sys.argv[1:]]; "
        f"runpy.run_path({str(EXPORT_SCRIPT)!r}, run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", runner, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_command_line_lays_out_an_exported_directory(tmp_path):
    exported = make_export(tmp_path / "export", CLASSIFIER)
    repository = tmp_path / "repository"
    args = [CLASSIFIER, "--exported", str(exported), "--repository", str(repository)]
    args += ["--version", "4"]
    done = run_export(*args, "--revision", "v1.0")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(repository / CLASSIFIER / "4")
    assert manifest["source"] == MODELS[CLASSIFIER].hub_id and manifest["revision"] == "v1.0"

    again = run_export(*args)
    assert again.returncode == 1
    assert "--force" in again.stderr and "Traceback" not in again.stderr
    assert run_export(*args, "--force", "--source", "/models/mine").returncode == 0
    manifest = read_manifest(repository / CLASSIFIER / "4")
    assert manifest["source"] == "/models/mine" and manifest["revision"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        ([CLASSIFIER, ENCODER, "--source", "x"], "exactly one"),
        (["roberta-large"], "unknown model"),
        ([ENCODER, "--version", "0", "--exported", "."], "positive integer"),
        ([ENCODER, "--versions-served", "0", "--exported", "."], "positive number or 'all'"),
        ([ENCODER, "--versions-served", "latest", "--exported", "."], "positive number or 'all'"),
        ([ENCODER, "--instance-kind", "tpu", "--exported", "."], "invalid choice"),
    ],
)
def test_command_line_rejects_bad_arguments(tmp_path, args, message):
    done = run_export(*args, "--repository", str(tmp_path / "repository"))
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert not (tmp_path / "repository").exists()


# --- the laid-out repository, served -------------------------------------------------------


@pytest.fixture(scope="module")
def exported_server(tmp_path_factory):
    """A server on a repository made by the command line from both committed versions."""
    root = tmp_path_factory.mktemp("exported")
    repository = root / "repository"
    for model in (CLASSIFIER, ENCODER, DECODER):
        for version in ("1", "2"):
            exported = make_export(root / f"{model}-{version}", model, version)
            args = ["--exported", str(exported), "--repository", str(repository),
                    "--versions-served", "all"]
            done = run_export(model, *args, "--version", version)
            assert done.returncode == 0, done.stderr
    with running_server(repository, root / "tritonserver.log") as triton:
        # Before any client request: what the statistics count now is the warm-up.
        triton.stats_at_ready = {
            model: version_stats(triton, model) for model in (CLASSIFIER, ENCODER, DECODER)
        }
        yield triton


def version_stats(server, model: str) -> dict[str, dict]:
    response = server.get(f"/v2/models/{model}/stats")
    assert response.status_code == 200, response.text
    return {stats["version"]: stats for stats in response.json()["model_stats"]}


def test_every_exported_model_version_is_ready(exported_server):
    index = repository_index(exported_server)
    for model in (CLASSIFIER, ENCODER, DECODER):
        states = {entry["version"]: entry.get("state") for entry in index[model]}
        assert states == {"1": "READY", "2": "READY"}, (model, index[model])


@pytest.mark.parametrize("model", [CLASSIFIER, ENCODER, DECODER])
def test_exported_models_warm_up_through_the_backend(exported_server, model):
    """Each version's instances ran the config's warm-up sample at load, reported by the
    backend as one successful execution each (see tests/test_lifecycle.py): two
    instances for the encoders, one for the decoder."""
    stats = exported_server.stats_at_ready[model]
    assert set(stats) == {"1", "2"}, stats
    instances = 1 if model == DECODER else 2
    for version, entry in stats.items():
        inference = entry["inference_stats"]
        assert (entry["execution_count"], entry["inference_count"]) == (instances, instances), (version, entry)
        assert inference["success"]["count"] == instances and inference["fail"]["count"] == 0, entry
    assert "failed to run warmup sample" not in exported_server.log()


@pytest.mark.parametrize("version", ["1", "2"])
def test_exported_classifier_answers_with_the_label_names_of_config_json(exported_server, version):
    reference = load_reference(CLASSIFIER)
    cases = reference["versions"][version]
    response = infer(
        exported_server,
        f"{CLASSIFIER}/versions/{version}",
        [text_input([c["text"] for c in cases])],
    )
    assert response.status_code == 200, response.text
    outputs = outputs_by_name(response)
    renamed = {old: new for old, new in zip(reference["labels"], LABELS)}
    assert outputs["sentiment_label"]["data"] == [renamed[c["label"]] for c in cases]
    scores = np.array(outputs["sentiment_score"]["data"]).reshape(
        outputs["sentiment_score"]["shape"]
    )
    np.testing.assert_allclose(scores, [c["probabilities"] for c in cases], rtol=0, atol=1e-4)


@pytest.mark.parametrize("version", ["1", "2"])
def test_exported_encoder_answers_like_the_reference(exported_server, version):
    cases = load_reference(ENCODER)["versions"][version]
    response = infer(
        exported_server,
        f"{ENCODER}/versions/{version}",
        [text_input([c["text"] for c in cases])],
        outputs=["embedding"],
    )
    assert response.status_code == 200, response.text
    embedding = outputs_by_name(response)["embedding"]
    assert embedding["shape"] == [len(cases), HF_CONFIGS[ENCODER]["hidden_size"]]
    np.testing.assert_allclose(
        np.array(embedding["data"]).reshape(embedding["shape"]),
        [c["embedding"] for c in cases],
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.parametrize("version", ["1", "2"])
def test_exported_decoder_generates_the_reference_greedy_text(exported_server, version):
    assert_greedy_reference(exported_server, DECODER, version)


def test_exported_configs_are_served_as_written(exported_server):
    config = exported_server.get(f"/v2/models/{CLASSIFIER}/config").json()
    assert config["backend"] == "rust"
    assert config["parameters"]["labels"]["string_value"] == ",".join(LABELS)
    assert config["output"][0]["dims"] == [-1, len(LABELS)]
    decoder = exported_server.get(f"/v2/models/{DECODER}/config").json()
    assert decoder["parameters"]["eos_token"]["string_value"] == "<|endoftext|>"
    assert decoder["parameters"]["max_sequence_length"]["string_value"] == "128"
