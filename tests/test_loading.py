"""Model and ONNX Runtime loading failures.

Broken models fail to load with a message naming the cause, the server stays up, and
the models loaded beside them keep serving. One explicit-mode server (`--model-control-
mode=explicit`) holds every broken model of the table; each test loads one through
`POST /v2/repository/models/<m>/load`. The ONNX Runtime lookup cases need a server each,
since the library is loaded once per process.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from conftest import (
    classifier_config,
    MODEL_REPOSITORY,
    running_server,
    assert_error,
    assert_serves,
    error_message,
    infer,
    load_model,
    outputs_by_name,
    repository_index,
    text_input,
)

CLASSIFIER = "sentiment-classifier"
ENCODER = "bert-base"
# Under Triton's default strict readiness, one failed load turns /v2/health/ready to 400
# for good (even after an unload): the server then reports "not every model is ready",
# which is Triton's rule, not a backend fault. These servers drop strict readiness, so
# `is_healthy()` means the server itself is up; each serving model's readiness is
# checked on its own.
EXPLICIT = ["--model-control-mode=explicit", "--strict-readiness=false"]

# --- Building broken models ------------------------------------------------------------

ConfigEdit = Callable[[str], str]
FilesEdit = Callable[[Path], None]


def replace(old: str, new: str) -> ConfigEdit:
    def edit(config: str) -> str:
        assert old in config, f"the example config.pbtxt changed: {old!r} not found"
        return config.replace(old, new)

    return edit


def parameter_line(key: str, value: str) -> str:
    return f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}'


def set_parameter(key: str, value: str) -> ConfigEdit:
    """Replaces parameter `key` if the config has it, else adds it."""

    def edit(config: str) -> str:
        lines = [line for line in config.splitlines() if f'key: "{key}"' not in line]
        return "\n".join([*lines, parameter_line(key, value)]) + "\n"

    return edit


def drop_parameter(key: str) -> ConfigEdit:
    def edit(config: str) -> str:
        assert f'key: "{key}"' in config, f"the example config.pbtxt has no parameter {key!r}"
        return "\n".join(l for l in config.splitlines() if f'key: "{key}"' not in l) + "\n"

    return edit


def keep(config: str) -> str:
    return config


def no_change(version_dir: Path) -> None:
    return None


def remove_file(name: str) -> FilesEdit:
    return lambda version_dir: (version_dir / name).unlink()


def overwrite_file(name: str, data: bytes) -> FilesEdit:
    return lambda version_dir: (version_dir / name).write_bytes(data)


@dataclass
class Broken:
    """A copy of example model `base` with one thing wrong, and what the error must say."""

    base: str
    fragments: tuple[str, ...]
    config: ConfigEdit = keep
    files: FilesEdit = no_change


def make_model(
    repository: Path, name: str, base: str, config: ConfigEdit = keep, files: FilesEdit = no_change
):
    """Copies version 1 of example model `base` (and its warm-up data) to
    `repository/name`, then edits it."""
    shutil.copytree(MODEL_REPOSITORY / base / "1", repository / name / "1")
    shutil.copytree(MODEL_REPOSITORY / base / "warmup", repository / name / "warmup")
    text = (MODEL_REPOSITORY / base / "config.pbtxt").read_text()
    text = replace(f'name: "{base}"', f'name: "{name}"')(text)
    (repository / name / "config.pbtxt").write_text(config(text))
    files(repository / name / "1")


RANDOM_BYTES = random.Random(0).randbytes(4096)
# GPT-2's own tokenizer: ids up to 50256, far past the bundled models' 2,000 tokens.
GPT2_TOKENIZER = (Path(__file__).parent / "fixtures" / "gpt2-tokenizer" / "tokenizer.json").read_bytes()
ANOTHER_MODELS_TOKENIZER = ("tokenizer.json gives ids up to 50256 ('<|endoftext|>')",
                            "another model's", "embedding table")

BROKEN = {
    "missing-model-onnx": Broken(
        CLASSIFIER, ("model.onnx", "does not exist"), files=remove_file("model.onnx")
    ),
    "missing-tokenizer-json": Broken(
        CLASSIFIER, ("tokenizer.json", "does not exist"), files=remove_file("tokenizer.json")
    ),
    "corrupt-model-onnx": Broken(
        CLASSIFIER, ("model.onnx",), files=overwrite_file("model.onnx", RANDOM_BYTES)
    ),
    "corrupt-tokenizer-json": Broken(
        ENCODER, ("tokenizer.json",), files=overwrite_file("tokenizer.json", b'{"version": "1.0", ')
    ),
    "unknown-parameter": Broken(
        CLASSIFIER, ("unknown parameter 'max_seq_len'",), config=set_parameter("max_seq_len", "64")
    ),
    "missing-task": Broken(CLASSIFIER, ("'task' is required",), config=drop_parameter("task")),
    "prompts-beyond-the-running-batch": Broken(
        "gpt2-small",
        ("'max_prompts_per_request' is 64", "'max_sequences_in_flight' is 8", "could never run"),
        config=set_parameter("max_sequences_in_flight", "8"),
    ),
    "bad-task": Broken(ENCODER, ("'task'", "translate"), config=set_parameter("task", "translate")),
    "negative-max-sequence-length": Broken(
        CLASSIFIER, ("max_sequence_length", "-3"), config=set_parameter("max_sequence_length", "-3")
    ),
    "zero-thread-count": Broken(
        ENCODER,
        ("intra_op_thread_count", "'0'"),
        config=set_parameter("intra_op_thread_count", "0"),
    ),
    "four-labels-for-three-classes": Broken(
        CLASSIFIER,
        ("'labels'", "name 4 classes", "outputs 3"),
        config=set_parameter("labels", "negative,neutral,positive,mixed"),
    ),
    "labels-on-feature-extraction": Broken(
        ENCODER, ("'labels'", "sentiment-classifier"), config=set_parameter("labels", "a,b,c")
    ),
    "pad-token-not-in-vocabulary": Broken(
        ENCODER, ("pad_token", "<nope>"), config=set_parameter("pad_token", "<nope>")
    ),
    "output-wrong-datatype": Broken(
        CLASSIFIER,
        ("sentiment_score", "TYPE_FP32", "TYPE_INT32"),
        config=replace(
            'name: "sentiment_score", data_type: TYPE_FP32',
            'name: "sentiment_score", data_type: TYPE_INT32',
        ),
    ),
    "unknown-output": Broken(
        CLASSIFIER,
        ("sentiment_probs",),
        config=replace('name: "sentiment_score"', 'name: "sentiment_probs"'),
    ),
    "input-wrong-datatype": Broken(
        CLASSIFIER,
        ("text_input", "TYPE_STRING", "TYPE_INT32"),
        config=replace(
            'name: "text_input", data_type: TYPE_STRING',
            'name: "text_input", data_type: TYPE_INT32',
        ),
    ),
    "another-models-tokenizer": Broken(
        CLASSIFIER, ANOTHER_MODELS_TOKENIZER,
        files=overwrite_file("tokenizer.json", GPT2_TOKENIZER),
    ),
    "a-decoder-with-another-models-tokenizer": Broken(
        "gpt2-small", ANOTHER_MODELS_TOKENIZER,
        files=overwrite_file("tokenizer.json", GPT2_TOKENIZER),
    ),
    "ids-declared-without-mask": Broken(
        ENCODER,
        ("input_ids", "attention_mask", "together"),
        config=replace(
            ' optional: true },\n'
            '  { name: "attention_mask", data_type: TYPE_INT64, dims: [ -1, -1 ], optional: true }',
            " optional: true }",
        ),
    ),
}
# Models for the tests below: one to repair, one asking for a GPU, one to load with a
# configuration override.
RECOVERED = "recover-me"
GPU_MODEL = "gpu-instance"
OVERRIDE_MODEL = "override-target"
SERVING = (CLASSIFIER, ENCODER)


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory):
    """An explicit-mode server holding the broken models, with the two example models
    loaded; the broken ones are loaded by the tests."""
    root = tmp_path_factory.mktemp("loading")
    repository = root / "model-repository"
    for model in SERVING:
        make_model(repository, model, model)
    for name, broken in BROKEN.items():
        make_model(repository, name, broken.base, broken.config, broken.files)
    make_model(repository, RECOVERED, CLASSIFIER, files=remove_file("model.onnx"))
    make_model(repository, GPU_MODEL, CLASSIFIER, replace("kind: KIND_CPU", "kind: KIND_GPU"))
    make_model(repository, OVERRIDE_MODEL, CLASSIFIER)
    args = [*EXPLICIT, *(f"--load-model={m}" for m in SERVING)]
    with running_server(repository, root / "tritonserver.log", args) as triton:
        yield triton


def assert_load_fails(server, model: str, *fragments: str, config=None) -> str:
    """The load is refused with a 400 naming the cause; the index shows the model
    unavailable with that reason; the server stays healthy and keeps serving."""
    message = assert_error(load_model(server, model, config), *fragments)
    entries = repository_index(server)[model]
    assert all(e.get("state") == "UNAVAILABLE" for e in entries), entries
    reasons = " ".join(e.get("reason", "") for e in entries)
    assert fragments[0].lower() in reasons.lower(), entries
    assert server.is_healthy(), server.log()[-5000:]
    for serving in SERVING:
        assert server.get(f"/v2/models/{serving}/ready").status_code == 200, serving
        assert_serves(server, serving)
    return message


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_broken_model_fails_to_load(explicit_server, case):
    message = assert_load_fails(explicit_server, case, *BROKEN[case].fragments)
    assert case in message, f"the error should name the model: {message}"


def test_repaired_model_loads(explicit_server):
    assert_load_fails(explicit_server, RECOVERED, "model.onnx", "does not exist")
    version_dir = explicit_server.repository / RECOVERED / "1"
    shutil.copy(MODEL_REPOSITORY / CLASSIFIER / "1" / "model.onnx", version_dir / "model.onnx")
    response = load_model(explicit_server, RECOVERED)
    assert response.status_code == 200, error_message(response)
    assert [e["state"] for e in repository_index(explicit_server)[RECOVERED]] == ["READY"]
    assert_serves(explicit_server, RECOVERED, like=CLASSIFIER)


def test_gpu_instance_without_gpu_fails_to_load(explicit_server):
    """No GPU here, and the CPU build of ONNX Runtime: KIND_GPU must be refused clearly
    (by Triton, which finds no GPU, or by the backend, which cannot enable CUDA), never
    run on the CPU instead."""
    message = assert_load_fails(explicit_server, GPU_MODEL, "GPU")
    assert "KIND_GPU" in message or "CUDA" in message, message


# --- 9. Config override through the load API --------------------------------------------


def test_config_override_with_bad_parameter_fails(explicit_server):
    config = classifier_config(
        OVERRIDE_MODEL, task="sentiment-classifier", max_seq_len="64"
    )
    assert_load_fails(
        explicit_server, OVERRIDE_MODEL, "unknown parameter 'max_seq_len'", config=config
    )


def test_config_override_with_huge_thread_count_fails_fast(explicit_server):
    """intra_op_thread_count "100000" once hung the load for minutes while memory grew
    to gigabytes; every number a configuration sets is bounded now."""
    config = classifier_config(
        OVERRIDE_MODEL, task="sentiment-classifier", intra_op_thread_count="100000"
    )
    started = time.monotonic()
    assert_load_fails(
        explicit_server,
        OVERRIDE_MODEL,
        "parameter 'intra_op_thread_count' must be at most",
        config=config,
    )
    assert time.monotonic() - started < 10
    assert explicit_server.get("/v2/health/live").status_code == 200


def test_sequence_batching_is_refused_before_triton_sizes_it(explicit_server):
    """No task keeps state between requests. With a max_batch_size of 2^31 - 1, Triton's
    sequence batcher aborted the whole server (std::bad_alloc) sizing its slots; the
    backend refuses the configuration first."""
    config = classifier_config(
        OVERRIDE_MODEL, task="sentiment-classifier", max_sequence_length="128"
    )
    config.update(max_batch_size=2**31 - 1, sequence_batching={})
    assert_load_fails(
        explicit_server,
        OVERRIDE_MODEL,
        "sequence_batching is not supported",
        "dynamic_batching",
        config=config,
    )


def relabelled_classifier(labels: list[str]) -> dict:
    """The example classifier's config as an override, with other label names."""
    return classifier_config(
        OVERRIDE_MODEL,
        task="sentiment-classifier",
        labels=",".join(labels),
        max_sequence_length="128",
    )


def test_config_override_applies(explicit_server):
    labels = ["bad", "meh", "good"]
    response = load_model(explicit_server, OVERRIDE_MODEL, relabelled_classifier(labels))
    assert response.status_code == 200, error_message(response)
    response = infer(explicit_server, OVERRIDE_MODEL, [text_input(["I love it!", "Awful."])])
    assert response.status_code == 200, response.text[:2000]
    assert set(outputs_by_name(response)["sentiment_label"]["data"]) <= set(labels)


def test_reload_under_load_fails_no_request(explicit_server):
    """Reloading a model that clients keep using (other labels through a config override,
    and back), while another model serves too: no request fails, and the answers switch
    labels once each reload returns."""
    old_labels, new_labels = ["neg", "neu", "pos"], ["bad", "meh", "good"]

    def reload(labels):
        response = load_model(explicit_server, OVERRIDE_MODEL, relabelled_classifier(labels))
        assert response.status_code == 200, error_message(response)

    def labels_now() -> set[str]:
        response = infer(explicit_server, OVERRIDE_MODEL, [text_input(["I love it!", "Awful."])])
        assert response.status_code == 200, response.text[:2000]
        return set(outputs_by_name(response)["sentiment_label"]["data"])

    reload(old_labels)
    stop = threading.Event()
    sent: dict[str, int] = {OVERRIDE_MODEL: 0, ENCODER: 0}
    failures: list[str] = []

    def traffic(model: str) -> None:
        while not stop.is_set():
            response = infer(explicit_server, model, [text_input(["Still serving?"])])
            sent[model] += 1
            if response.status_code != 200:
                failures.append(f"{model}: {response.status_code} {response.text[:300]}")

    threads = [threading.Thread(target=traffic, args=(m,)) for m in sent]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            reload(new_labels)
            assert labels_now() <= set(new_labels)
            reload(old_labels)
            assert labels_now() <= set(old_labels)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:5]
    assert all(count > 0 for count in sent.values()), sent


# --- 10. Finding ONNX Runtime ------------------------------------------------------------


@pytest.fixture
def bare_backend_dir(tmp_path, monkeypatch):
    """A backend directory with libtriton_rust.so alone (no ONNX Runtime beside it), and
    no ORT_DYLIB_PATH in the environment."""
    monkeypatch.delenv("ORT_DYLIB_PATH", raising=False)
    source = Path(os.environ["TRITON_RUST_BACKEND_DIR"])
    backend_dir = tmp_path / "backends"
    (backend_dir / "rust").mkdir(parents=True)
    shutil.copy(source / "rust" / "libtriton_rust.so", backend_dir / "rust" / "libtriton_rust.so")
    return backend_dir


@pytest.fixture
def ort_library():
    return os.environ["TRITON_RUST_ORT_LIBRARY"]


def start_explicit(start_server, backend_dir, args=(), env=None):
    return start_server(MODEL_REPOSITORY, args=[*EXPLICIT, *args], env=env, backend_dir=backend_dir)


def test_no_onnxruntime_anywhere(start_server, bare_backend_dir):
    triton = start_explicit(start_server, bare_backend_dir)
    message = assert_error(load_model(triton, CLASSIFIER), "onnxruntime-library", "ORT_DYLIB_PATH")
    assert str(bare_backend_dir) in message, message
    assert triton.is_healthy()


@pytest.mark.parametrize("source", ["backend-config", "env", "backend-config-over-env"])
def test_onnxruntime_found(start_server, bare_backend_dir, ort_library, tmp_path, source):
    not_a_library = tmp_path / "not-onnxruntime.so"
    not_a_library.write_text("not a shared library\n")
    backend_config = [f"--backend-config=rust,onnxruntime-library={ort_library}"]
    args, env = {
        "backend-config": (backend_config, {}),
        "env": ([], {"ORT_DYLIB_PATH": ort_library}),
        # The backend config wins over the environment.
        "backend-config-over-env": (backend_config, {"ORT_DYLIB_PATH": str(not_a_library)}),
    }[source]
    triton = start_explicit(start_server, bare_backend_dir, args, env)
    response = load_model(triton, CLASSIFIER)
    assert response.status_code == 200, error_message(response)
    assert_serves(triton, CLASSIFIER)
    assert f"ONNX Runtime library: {ort_library}" in triton.log()


# What the error must add to the library's path and where the setting came from.
UNUSABLE_LIBRARIES = {
    # dlopen's own reason ("file too short", "invalid ELF header") would help more, but
    # the file and the setting are what the user must fix.
    "text-file": (),
    # A wrong path is the common mistake: say the file is not there.
    "missing-file": ("does not exist",),
}


@pytest.mark.parametrize("kind", UNUSABLE_LIBRARIES, ids=str)
def test_onnxruntime_library_unusable(start_server, bare_backend_dir, tmp_path, kind):
    library = tmp_path / "libonnxruntime.so.1.31.1"
    if kind == "text-file":
        library.write_text("this is not a shared library\n")
    triton = start_explicit(
        start_server,
        bare_backend_dir,
        [f"--backend-config=rust,onnxruntime-library={library}"],
    )
    assert_error(
        load_model(triton, CLASSIFIER),
        "ONNX Runtime library",
        str(library),
        "onnxruntime-library",
        *UNUSABLE_LIBRARIES[kind],
    )
    assert triton.is_healthy()


# --- glibc's mmap threshold (backend/src/heap.rs) -----------------------------------------


@pytest.mark.parametrize(
    "args, env, expected",
    [
        ([], {}, "malloc mmap threshold fixed at 262144 bytes"),
        (["--backend-config=rust,malloc-mmap-threshold=1048576"], {}, "fixed at 1048576 bytes"),
        ([], {"MALLOC_MMAP_THRESHOLD_": "131072"}, "left as it is (set by the environment)"),
        (["--backend-config=rust,malloc-mmap-threshold=0"], {}, "left as it is (malloc-mmap-threshold=0)"),
    ],
    ids=["default", "configured", "environment", "off"],
)
def test_the_malloc_mmap_threshold_setting(start_server, args, env, expected):
    triton = start_explicit(start_server, None, args, env)
    response = load_model(triton, CLASSIFIER)
    assert response.status_code == 200, error_message(response)
    assert expected in triton.log()


def test_a_bad_malloc_mmap_threshold_fails_the_load_with_its_name(start_server):
    triton = start_explicit(start_server, None, ["--backend-config=rust,malloc-mmap-threshold=lots"])
    assert_error(load_model(triton, CLASSIFIER), "malloc-mmap-threshold", "a number of bytes")
    assert triton.is_healthy()


# --- GPU-only servers (--backend-config=rust,require-gpu=true) -------------------------------


def test_a_gpu_only_server_refuses_cpu_instances_and_still_loads_routers(start_server):
    """A server told to run models on GPU instances only (as the Kubernetes Deployment,
    which holds a GPU, is) refuses a KIND_CPU model with the reason instead of leaving the
    GPU idle; on this machine without a GPU, KIND_AUTO resolves to KIND_CPU and is refused
    too. A router runs no model, so its kind does not matter: it fails here only because
    its targets are not loaded."""
    triton = start_explicit(start_server, None, ["--backend-config=rust,require-gpu=true"])
    assert_error(
        load_model(triton, CLASSIFIER),
        "takes GPU instances only (--backend-config=rust,require-gpu=true)",
        "an instance_group has kind KIND_CPU: set kind: KIND_GPU",
        "--instance-kind gpu",
    )
    auto = classifier_config(CLASSIFIER, task="sentiment-classifier", max_sequence_length="128")
    auto["instance_group"] = [{"count": 1, "kind": "KIND_AUTO"}]
    assert_error(load_model(triton, CLASSIFIER, auto), "has kind KIND_CPU")
    router = router_config("sentiment-classifier-ab", target_ready_timeout_s="1")
    message = error_message(load_model(triton, "sentiment-classifier-ab", router))
    assert "sentiment-classifier" in message and "GPU instances" not in message, message
    assert "require-gpu=true" in triton.log()
    assert triton.is_healthy()


def router_config(name: str, **parameters: str) -> dict:
    """An example router's config.pbtxt as JSON, with the given parameters changed."""
    text = (MODEL_REPOSITORY / name / "config.pbtxt").read_text()
    config = json_format.MessageToDict(
        text_format.Parse(text, model_config_pb2.ModelConfig()), preserving_proto_field_name=True
    )
    for key, value in parameters.items():
        config["parameters"][key] = {"string_value": value}
    return config


def test_a_bad_require_gpu_value_fails_the_load_with_its_name(start_server):
    triton = start_explicit(start_server, None, ["--backend-config=rust,require-gpu=yes"])
    assert_error(load_model(triton, CLASSIFIER), "require-gpu=yes", "expected true or false")
    assert triton.is_healthy()
