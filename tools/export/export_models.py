#!/usr/bin/env python3
"""Export Hugging Face models into a model repository served by the rust backend.

    python tools/export/export_models.py [MODEL ...] --repository DIR [--version N]
        [--source HUB_ID_OR_DIR] [--revision REV] [--force] [--exported DIR]
        [--versions-served N|all] [--instance-kind cpu|gpu]

MODEL is one of (default: all three)

    sentiment-classifier  cardiffnlp/twitter-roberta-base-sentiment-latest
    bert-base             bert-base-uncased
    gpt2-small            gpt2

Each model is loaded with `from_pretrained` (hub id or local directory; --source and
--revision choose another one), exported to ONNX by optimum (the input and output names the
backend reads, GPT-2 with past key values; tools/fixtures/make_test_models.py exports the
test models the same way), checked against the PyTorch model with onnxruntime, and laid out
by repository_layout.py as <DIR>/<MODEL>/<N>/{model.onnx,tokenizer.json,manifest.json} plus
<DIR>/<MODEL>/config.pbtxt and the warm-up data it names, <DIR>/<MODEL>/warmup/text_input.bin.
Exporting needs torch, transformers and optimum (tools/export/requirements.txt); --exported
DIR skips it and lays out a directory that already holds model.onnx, tokenizer.json and the
Hugging Face config.json, which needs only the Python standard library. See
docs/real-models.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import repository_layout as layout  # noqa: E402

# A text whose answers are compared between PyTorch and onnxruntime after each export.
PARITY_TEXT = "The exported graph must answer exactly like the original model."
PARITY_TOLERANCE = 1e-3


class ExportError(Exception):
    """The exported ONNX graph does not answer like the PyTorch model."""


@dataclass(frozen=True)
class ModelSpec:
    """A model of the repository: the backend task it serves and where it comes from."""

    task: str
    hub_id: str
    auto_class: str  # the transformers Auto class that loads it


MODELS = {
    "sentiment-classifier": ModelSpec(
        "sentiment-classifier",
        "cardiffnlp/twitter-roberta-base-sentiment-latest",
        "AutoModelForSequenceClassification",
    ),
    "bert-base": ModelSpec("feature-extraction", "bert-base-uncased", "AutoModel"),
    "gpt2-small": ModelSpec("text-generation", "gpt2", "AutoModelForCausalLM"),
}


def versions_served(value: str) -> int | None:
    """--versions-served: a positive number, or "all" (None)."""
    if value == "all":
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {value!r}")


def serving(args: argparse.Namespace) -> layout.Serving:
    return layout.Serving(versions=args.versions_served, gpu=args.instance_kind == "gpu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help=f"models to export: {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--repository", type=Path, required=True, help="the model repository to write into"
    )
    parser.add_argument(
        "--version", type=int, default=1, help="version directory to write (default: 1)"
    )
    parser.add_argument("--source", help="hub id or local directory (default: the model's hub id)")
    parser.add_argument("--revision", help="hub branch, tag or commit; recorded for local sources")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing version directory or a differing config.pbtxt",
    )
    parser.add_argument(
        "--versions-served",
        type=versions_served,
        default=1,
        metavar="N|all",
        help="versions the config loads: the newest N, or all, as an A/B router over "
        "versions needs (default: 1; each loaded version holds its own weights)",
    )
    parser.add_argument(
        "--instance-kind",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the example configs' instances (default); gpu: one KIND_GPU instance "
        "per GPU (the image's CUDA build of ONNX Runtime, see the README's GPU instances)",
    )
    parser.add_argument(
        "--exported",
        type=Path,
        help="lay out this directory (model.onnx, "
        "tokenizer.json, config.json) instead of exporting",
    )
    args = parser.parse_args(argv)
    args.models = args.models or list(MODELS)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if (args.source or args.exported) and len(args.models) != 1:
        parser.error("--source and --exported apply to one model: name exactly one")
    return args


# --------------------------------------------------------------------------- #
# The export step (torch + transformers, imported only here)
# --------------------------------------------------------------------------- #


def load_source(spec: ModelSpec, source: str, revision: str | None):
    """The model (eager attention, which optimum's TorchScript export traces) and tokenizer."""
    import transformers

    auto_class = getattr(transformers, spec.auto_class)
    model = auto_class.from_pretrained(source, revision=revision, attn_implementation="eager")
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
    return model, tokenizer


def save_metadata(model, tokenizer, staging: Path) -> None:
    """tokenizer.json and the full config.json, which the layout step reads."""
    tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
    model.config.to_json_file(str(staging / layout.HF_CONFIG), use_diff=False)


def parity_inputs(tokenizer):
    """PARITY_TEXT as the backend tokenizes it (with tokenizer.json), batch of one."""
    import numpy as np

    encoding = tokenizer.backend_tokenizer.encode(PARITY_TEXT)
    return np.array([encoding.ids], dtype=np.int64), np.array([encoding.type_ids], dtype=np.int64)


def torch_answer(task: str, model, ids, type_ids):
    """The PyTorch outputs the ONNX graph must reproduce (the last position's logits for
    text generation). Computed before exporting: tracing for the export can disturb the
    eager model in the same process."""
    import torch

    ids, type_ids = torch.from_numpy(ids), torch.from_numpy(type_ids)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if task == "sentiment-classifier":
            return model(input_ids=ids, attention_mask=mask).logits.numpy()
        if task == "feature-extraction":
            outputs = model(input_ids=ids, attention_mask=mask, token_type_ids=type_ids)
            return outputs.last_hidden_state.numpy()
        return model(input_ids=ids, attention_mask=mask).logits[:, -1].numpy()


# The optimum export task for each backend task: the graph with the input and output names
# the backend reads (GPT-2 with position ids and past key values, one model.onnx that also
# takes an empty past for the prefill).
OPTIMUM_TASKS = {
    "sentiment-classifier": "text-classification",
    "feature-extraction": "feature-extraction",
    "text-generation": "text-generation-with-past",
}


def export_graph(task: str, model, path: Path) -> None:
    """optimum's ONNX export of the loaded model into path (a model.onnx); optimum checks
    the graph against the model on its own dummy inputs too."""
    from optimum.exporters.onnx import onnx_export_from_model

    with tempfile.TemporaryDirectory(prefix="optimum-") as output:
        output = Path(output)
        onnx_export_from_model(model, output, task=OPTIMUM_TASKS[task])
        external = sorted(f.name for f in output.iterdir() if f.name.endswith("_data"))
        if external:
            # Graphs over 2 GB keep their weights beside model.onnx; the layout copies
            # model.onnx alone.
            raise ExportError(
                f"the exported graph keeps its weights in {', '.join(external)} (over 2 GB), "
                "which the repository layout does not copy"
            )
        shutil.move(output / "model.onnx", path)


def onnx_answer(task: str, path: Path, config, ids, type_ids):
    """The exported graph's outputs for the same inputs as torch_answer. Text generation
    runs a prefill without the last token, then one cached step with it, so the past key
    value wiring is checked too."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mask = np.ones_like(ids)
    if task == "sentiment-classifier":
        return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    if task == "feature-extraction":
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids}
        return session.run(["last_hidden_state"], feed)[0]
    heads, layers = config.n_head, config.n_layer
    empty = np.zeros((1, heads, 0, config.n_embd // heads), dtype=np.float32)
    kv_names = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    n = ids.shape[1] - 1
    positions = np.arange(n + 1, dtype=np.int64)[None]
    prefill = {
        "input_ids": ids[:, :n],
        "attention_mask": mask[:, :n],
        "position_ids": positions[:, :n],
    }
    prefill.update({f"past_key_values.{kv}": empty for kv in kv_names})
    presents = session.run([f"present.{kv}" for kv in kv_names], prefill)
    step = {"input_ids": ids[:, n:], "attention_mask": mask, "position_ids": positions[:, n:]}
    step.update({f"past_key_values.{kv}": present for kv, present in zip(kv_names, presents)})
    return session.run(["logits"], step)[0][:, -1]


def check_parity(name: str, got, want) -> None:
    import numpy as np

    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or diff > PARITY_TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise ExportError(
            f"{name}: the ONNX graph differs from the PyTorch model (max abs diff {diff:.3g})"
        )
    print(f"{name}: onnxruntime matches PyTorch (max abs diff {diff:.3g})")


def tool_versions() -> dict[str, str]:
    from importlib.metadata import version

    packages = (
        "torch", "transformers", "optimum", "optimum-onnx", "tokenizers", "onnx", "onnxruntime"
    )
    return {"python": platform.python_version(), **{name: version(name) for name in packages}}


def source_id(source: str) -> str:
    """The source as the manifest records it: from_pretrained prefers an existing local
    directory to a hub id of the same name, so such a source is recorded by absolute path."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def export(name: str, spec: ModelSpec, args: argparse.Namespace) -> None:
    """Export one model from its source and lay it out (checked before the slow export)."""
    source = source_id(args.source or spec.hub_id)
    target = layout.Target(args.repository, name, args.version)
    model, tokenizer = load_source(spec, source, args.revision)
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    files = layout.model_files(
        name, spec.task, model.config.to_dict(), tokenizer_json, serving(args)
    )
    layout.check_target(target, files, args.force)
    with tempfile.TemporaryDirectory(prefix=f"export-{name}-") as staging:
        staging = Path(staging)
        save_metadata(model, tokenizer, staging)
        ids, type_ids = parity_inputs(tokenizer)
        want = torch_answer(spec.task, model, ids, type_ids)
        export_graph(spec.task, model, staging / "model.onnx")
        got = onnx_answer(spec.task, staging / "model.onnx", model.config, ids, type_ids)
        check_parity(name, got, want)
        # The hub commit that from_pretrained resolved; None for a local directory.
        revision = getattr(model.config, "_commit_hash", None) or args.revision
        provenance = layout.Provenance(source, revision, tool_versions())
        version_dir = layout.install(
            staging, target, spec.task, provenance, args.force, serving(args)
        )
    print(f"{name}: wrote {version_dir}")


def lay_out(name: str, spec: ModelSpec, args: argparse.Namespace) -> None:
    """Lay out an already exported directory (--exported); only the standard library."""
    target = layout.Target(args.repository, name, args.version)
    tools = {"python": platform.python_version()}
    provenance = layout.Provenance(source_id(args.source or spec.hub_id), args.revision, tools)
    version_dir = layout.install(
        args.exported, target, spec.task, provenance, args.force, serving(args)
    )
    print(f"{name}: wrote {version_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    step = lay_out if args.exported else export
    try:
        for name in args.models:
            step(name, MODELS[name], args)
    except (layout.LayoutError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
