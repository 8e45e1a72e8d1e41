"""Lay out an exported model as one version of a Triton model repository (stdlib only).

The export step (export_models.py, torch + transformers) leaves a directory holding
`model.onnx`, `tokenizer.json` and the Hugging Face `config.json`. This module turns it
into what the rust backend serves:

    <repository>/<model>/config.pbtxt               backend "rust", from config.json
    <repository>/<model>/warmup/text_input.bin      the config's warm-up request
    <repository>/<model>/<version>/model.onnx
    <repository>/<model>/<version>/tokenizer.json
    <repository>/<model>/<version>/manifest.json    source, revision, sha256, date, tools

It imports nothing outside the standard library, so the CI test suite (which has no
torch) can exercise it on the small committed models, and models exported by other
tools can be laid out with `export_models.py --exported DIR`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

EXPORTED_FILES = ("model.onnx", "tokenizer.json")
HF_CONFIG = "config.json"
MANIFEST = "manifest.json"
CONFIG = "config.pbtxt"
# Triton reads a model_warmup sample's input_data_file from <model>/warmup/.
WARMUP_FILE = "warmup/text_input.bin"

# RoBERTa-family position ids start after the padding index, so max_position_embeddings
# (514 for roberta-base) exceeds the usable tokens (512) by pad_token_id + 1.
ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert"}


class LayoutError(Exception):
    """The export cannot be laid out; raised before the repository is changed."""


@dataclass(frozen=True)
class Provenance:
    """Where the exported files came from, recorded in the manifest."""

    source: str
    revision: str | None
    tools: dict[str, str]


@dataclass(frozen=True)
class Target:
    """One model version inside a model repository."""

    repository: Path
    model: str
    version: int

    def __post_init__(self):
        # Triton ignores version directories that are not positive integers.
        if self.version < 1:
            raise LayoutError(f"version must be a positive integer, got {self.version}")

    @property
    def model_dir(self) -> Path:
        return Path(self.repository) / self.model

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)

    @property
    def config_path(self) -> Path:
        return self.model_dir / CONFIG


# --------------------------------------------------------------------------- #
# config.pbtxt
# --------------------------------------------------------------------------- #

_HEADER = """\
# Written by tools/export/export_models.py; each version's manifest.json names its source.
name: {name}
backend: "rust"
max_batch_size: 0
{policy_comment}version_policy: {policy}

"""

_LATEST_COMMENT = """\
# Only the newest version{s} {is_are} loaded: every loaded version holds its own weights, so
# with real models each one more is another copy in memory. An A/B router over versions
# needs them loaded: export with --versions-served all (or a number).
"""

_ALL_COMMENT = """\
# Every version is loaded (for an A/B router over them); each holds its own weights.
"""


@dataclass(frozen=True)
class Serving:
    """How the config serves the model: the newest `versions` versions (None: all), on
    the CPU or one instance per GPU."""

    versions: int | None = 1
    gpu: bool = False


_GPU_INSTANCES = """
# One instance on each GPU (KIND_GPU: ONNX Runtime's CUDA provider, no fallback to the
# CPU); each holds its own copy of the weights on its device (see the README, "GPU
# instances").
instance_group [ { count: 1, kind: KIND_GPU } ]
"""


def version_policy(versions_served: int | None) -> tuple[str, str]:
    """The version_policy value and its comment: the newest `versions_served` versions,
    or every version (None)."""
    if versions_served is None:
        return "{ all { } }", _ALL_COMMENT
    if versions_served < 1:
        raise LayoutError(f"versions served must be at least 1, got {versions_served}")
    return (
        f"{{ latest {{ num_versions: {versions_served} }} }}",
        _LATEST_COMMENT.format(
            s="" if versions_served == 1 else f"s ({versions_served})",
            is_are="is" if versions_served == 1 else "are",
        ),
    )

_CLASSIFIER_IO = """\
input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ -1 ] }}
]
output [
  {{ name: "sentiment_score", data_type: TYPE_FP32, dims: [ -1, {classes} ] }},
  {{ name: "sentiment_label", data_type: TYPE_STRING, dims: [ -1 ] }}
]
"""

_ENCODER_IO = """\
input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ -1 ], optional: true }},
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1, -1 ], optional: true }},
  {{ name: "attention_mask", data_type: TYPE_INT64, dims: [ -1, -1 ], optional: true }}
]
output [
  {{ name: "last_hidden_state", data_type: TYPE_FP32, dims: [ -1, -1, {hidden} ] }},
  {{ name: "embedding", data_type: TYPE_FP32, dims: [ -1, {hidden} ] }}
]
"""

_GENERATION_IO = """\
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "sampling_parameters", data_type: TYPE_STRING, dims: [ 1 ], optional: true },
  { name: "exclude_input_in_output", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "return_finish_reason", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "return_num_input_tokens", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "return_num_output_tokens", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }
]
output [
  { name: "generated_text", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "finish_reason", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "num_input_tokens", data_type: TYPE_UINT32, dims: [ -1 ] },
  { name: "num_output_tokens", data_type: TYPE_UINT32, dims: [ -1 ] }
]
"""

_ENCODER_INSTANCES = """
# Two instances of one ONNX Runtime thread each, sharing the weights: one per core of a
# 2-core machine, each batching the requests that queue while it runs (see the README,
# "Sizing instances and threads").
instance_group [ { count: 2, kind: KIND_CPU } ]
"""

_GENERATION_INSTANCES = """
# One instance: its decode loop runs every sequence in flight as one batch (see the
# README, "Sizing instances and threads").
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

# The example configs' instances, by task.
_INSTANCES = {
    "sentiment-classifier": _ENCODER_INSTANCES,
    "feature-extraction": _ENCODER_INSTANCES,
    "text-generation": _GENERATION_INSTANCES,
}

# The example configs' queue: priorities, a bounded queue and a queue timeout, by task
# (waiting requests at most, µs in the queue at most).
_QUEUE_LIMITS = {
    "sentiment-classifier": (512, 5_000_000),
    "feature-extraction": (512, 5_000_000),
    "text-generation": (128, 60_000_000),
}

_QUEUE = """
# One queue per version: a request's "priority" parameter 1 goes before the default 2.
# Past {size} waiting requests, or {seconds} s in the queue (a request's "timeout"
# parameter, in µs, may ask for another limit), a request is rejected at once with a
# clear error instead of waiting on (see the README, "Priorities and queue limits").
dynamic_batching {{
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {{
    max_queue_size: {size}
    timeout_action: REJECT
    default_timeout_microseconds: {timeout_us}
    allow_timeout_override: true
  }}
}}

"""

# The sampling defaults of the example gpt2-small configuration.
_GENERATION_DEFAULTS = (("max_new_tokens", "50"), ("temperature", "0.7"), ("do_sample", "true"))


@dataclass(frozen=True)
class Warmup:
    """The model_warmup sample of a task: its name and the texts of its text_input."""

    sample: str
    texts: tuple[str, ...]
    what: str  # what the texts are, for the config's comment ("text", "prompt")
    note: str = ""  # more comment lines, each ending in a newline


# The warm-up of the example configs, texts included (model-repository/<model>/warmup/).
WARMUPS = {
    "sentiment-classifier": Warmup(
        "two_texts", ("What a wonderful day to warm up a model!", "Not great."), "text"
    ),
    "feature-extraction": Warmup(
        "two_texts", ("The quick brown fox jumps over the lazy dog.", "Warm-up text."), "text"
    ),
    "text-generation": Warmup(
        "short_prompt",
        ("The weather today is",),
        "prompt",
        "# It generates max_new_tokens (the default above) for one short prompt: a warm-up\n"
        "# request cannot carry request parameters.\n",
    ),
}

_WARMUP = """
# Warm-up: when each instance loads, Triton sends it this request (through this backend)
# before the model is ready, so the first client request does not pay for ONNX Runtime's
# first run. warmup/text_input.bin holds a serialized BYTES tensor of {count} {what}{s}: per element
# a 4-byte little-endian length, then the UTF-8 bytes (a plain-text file is refused).
{note}model_warmup [
  {{
    name: {sample}
    batch_size: 1
    inputs {{
      key: "text_input"
      value: {{ data_type: TYPE_STRING, dims: [ {count} ], input_data_file: {file} }}
    }}
  }}
]
"""


def bytes_tensor(texts) -> bytes:
    """Texts serialized as a Triton BYTES tensor, the form a TYPE_STRING warm-up file must
    have: per element a 4-byte little-endian length, then its UTF-8 bytes. Written here,
    not taken from tritonclient, because laying out an export needs only the standard
    library; tests/test_export.py checks it against tritonclient's serializer."""
    encoded = [text.encode("utf-8") for text in texts]
    return b"".join(struct.pack("<I", len(data)) + data for data in encoded)


def _warmup(task: str) -> Warmup:
    if task not in WARMUPS:
        raise LayoutError(f"unknown task {task!r}")
    return WARMUPS[task]


def warmup_data(task: str) -> bytes:
    """The contents of <model>/warmup/text_input.bin for `task`."""
    return bytes_tensor(_warmup(task).texts)


def render_warmup(task: str) -> str:
    """The config's model_warmup block, with the comment above it, as in the examples."""
    warmup = _warmup(task)
    count = len(warmup.texts)
    return _WARMUP.format(
        count=count,
        what=warmup.what,
        s="" if count == 1 else "s",
        note=warmup.note,
        sample=pbtxt_string(warmup.sample),
        file=pbtxt_string(Path(WARMUP_FILE).name),
    )


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal; control characters have no place in names."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise LayoutError(f"{value!r} contains control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _required(hf_config: dict, key: str):
    if key not in hf_config:
        raise LayoutError(f"{HF_CONFIG} has no '{key}'")
    return hf_config[key]


def context_length(hf_config: dict) -> int:
    """Tokens the model can attend to, special tokens included (max_sequence_length)."""
    if "n_positions" in hf_config:
        return int(hf_config["n_positions"])
    positions = int(_required(hf_config, "max_position_embeddings"))
    if hf_config.get("model_type") in ROBERTA_LIKE:
        return positions - int(_required(hf_config, "pad_token_id")) - 1
    return positions


def label_names(hf_config: dict) -> list[str]:
    """The classifier's label names by class index, from `id2label`.

    The backend reads them as one comma-separated string and trims each name, so a name
    with a comma or surrounding spaces could not come back unchanged: refuse it here.
    """
    id2label = _required(hf_config, "id2label")
    try:
        by_index = {int(index): str(name) for index, name in id2label.items()}
    except (AttributeError, ValueError):
        raise LayoutError(f"'id2label' in {HF_CONFIG} must map class indices to names") from None
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        raise LayoutError(f"'id2label' must cover the class indices 0..n-1, got {sorted(by_index)}")
    labels = [by_index[i] for i in range(len(by_index))]
    for name in labels:
        if not name or "," in name or name != name.strip():
            raise LayoutError(
                f"label {name!r} cannot be a backend label: names must be non-empty, "
                "without commas or surrounding spaces"
            )
    return labels


def token_for_id(tokenizer: dict, token_id: int) -> str:
    """The token string of an id in tokenizer.json (added tokens, then the vocabulary)."""
    for added in tokenizer.get("added_tokens") or []:
        if added.get("id") == token_id:
            return added["content"]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for token, index in vocab.items():
            if index == token_id:
                return token
    raise LayoutError(f"token id {token_id} is not in tokenizer.json")


def _parameters(pairs) -> str:
    """One `parameters` line per (key, value), as in the example configs."""
    line = "parameters: {{ key: {}, value: {{ string_value: {} }} }}\n"
    return "".join(line.format(pbtxt_string(key), pbtxt_string(value)) for key, value in pairs)


def _queue(task: str) -> str:
    size, timeout_us = _QUEUE_LIMITS[task]
    return _QUEUE.format(size=size, seconds=timeout_us // 1_000_000, timeout_us=timeout_us)


def render_config(
    model: str, task: str, hf_config: dict, tokenizer: dict, serving: Serving = Serving()
) -> str:
    """The config.pbtxt of `model`: the example configs' shape and warm-up, with the sizes,
    labels, context length and end-of-text token of this export, served as `serving`
    says."""
    length = ("max_sequence_length", str(context_length(hf_config)))
    threads = ("intra_op_thread_count", "1")
    if task == "sentiment-classifier":
        labels = label_names(hf_config)
        io = _CLASSIFIER_IO.format(classes=len(labels))
        pairs = [("task", task), ("labels", ",".join(labels)), length, threads]
    elif task == "feature-extraction":
        io = _ENCODER_IO.format(hidden=int(_required(hf_config, "hidden_size")))
        pairs = [("task", task), length, threads]
    elif task == "text-generation":
        eos = token_for_id(tokenizer, int(_required(hf_config, "eos_token_id")))
        io = _GENERATION_IO
        pairs = [("task", task), length, *_GENERATION_DEFAULTS, ("eos_token", eos), threads]
    else:
        raise LayoutError(f"unknown task {task!r}")
    policy, policy_comment = version_policy(serving.versions)
    return (
        _HEADER.format(name=pbtxt_string(model), policy=policy, policy_comment=policy_comment)
        + io
        + (_GPU_INSTANCES if serving.gpu else _INSTANCES[task])
        + _queue(task)
        + _parameters(pairs)
        + render_warmup(task)
    )


def model_files(
    model: str, task: str, hf_config: dict, tokenizer: dict, serving: Serving = Serving()
) -> dict[str, bytes]:
    """The files of the model directory that all its versions share, by path relative to
    it: config.pbtxt and the warm-up data it names."""
    config_text = render_config(model, task, hf_config, tokenizer, serving)
    return {CONFIG: config_text.encode("utf-8"), WARMUP_FILE: warmup_data(task)}


# --------------------------------------------------------------------------- #
# Checks and installation
# --------------------------------------------------------------------------- #


def read_exported(exported: Path) -> tuple[dict, dict]:
    """The Hugging Face config and the tokenizer of an export directory, checked complete."""
    exported = Path(exported)
    missing = [n for n in (*EXPORTED_FILES, HF_CONFIG) if not (exported / n).is_file()]
    if missing:
        raise LayoutError(f"{exported} lacks {', '.join(missing)}")
    try:
        return (
            json.loads((exported / HF_CONFIG).read_text(encoding="utf-8")),
            json.loads((exported / "tokenizer.json").read_text(encoding="utf-8")),
        )
    except json.JSONDecodeError as error:
        raise LayoutError(f"{exported}: {error}") from None


def check_target(target: Target, files: dict[str, bytes], force: bool) -> None:
    """Refuses to replace what exists unless `force`: the version directory, or a
    model-level file (config.pbtxt, the warm-up data) that differs from the one in `files`
    (other labels or sizes, or local edits that every version of the model shares)."""
    if force:
        return
    if target.version_dir.exists():
        raise LayoutError(f"{target.version_dir} exists; pass --force to replace it")
    for name, data in files.items():
        path = target.model_dir / name
        if path.exists() and path.read_bytes() != data:
            raise LayoutError(
                f"{path} differs from the one this export needs; pass --force to replace it"
            )


def write_model_files(target: Target, files: dict[str, bytes]) -> None:
    """Writes the model-level files, config.pbtxt last: the server may be polling the
    repository, and the config must not name a warm-up file that is not there yet."""
    for name in sorted(files, key=lambda name: name == CONFIG):
        path = target.model_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second, e.g. 2025-01-31T12:00:00Z."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def manifest(directory: Path, target: Target, task: str, provenance: Provenance) -> dict:
    """What a version directory holds and where it came from. The model-level files
    (config.pbtxt, the warm-up data) belong to all versions, not this one, so they are
    not recorded here."""
    return {
        "model": target.model,
        "version": target.version,
        "task": task,
        "source": provenance.source,
        "revision": provenance.revision,
        "exported_at": utc_now(),
        "tools": provenance.tools,
        "files": {
            name: {
                "sha256": sha256_file(directory / name),
                "size": (directory / name).stat().st_size,
            }
            for name in EXPORTED_FILES
        },
    }


def install(
    exported: Path,
    target: Target,
    task: str,
    provenance: Provenance,
    force: bool = False,
    serving: Serving = Serving(),
) -> Path:
    """Lays out `exported` as `target` and returns the version directory; the config
    serves the model as `serving` says.

    The version is assembled in a hidden sibling directory and renamed into place, so an
    interrupted run leaves no half-written version behind (Triton ignores names that are
    not numbers).
    """
    hf_config, tokenizer = read_exported(exported)
    files = model_files(target.model, task, hf_config, tokenizer, serving)
    check_target(target, files, force)
    target.model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{target.version}-", dir=target.model_dir))
    try:
        # mkdtemp makes it private (0700); the server may run as another user.
        staging.chmod(0o755)
        for name in EXPORTED_FILES:
            shutil.copyfile(Path(exported) / name, staging / name)
        record = manifest(staging, target, task, provenance)
        (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if target.version_dir.exists():
            shutil.rmtree(target.version_dir)
        staging.rename(target.version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_model_files(target, files)
    return target.version_dir
