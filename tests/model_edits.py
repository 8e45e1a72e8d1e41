"""Copies of the bundled models with their ONNX graphs edited:

- broken ones, as a float16 export that overflows is broken: the output turns NaN (or
  +inf) for every sequence that holds a chosen token, and stays the original's, bit for
  bit, for every other sequence;
- half-precision ones, with the float inputs and outputs of a float16 (or bfloat16)
  export: the graph casts them at its edges and computes in float32 inside, which is all
  a backend sees of such an export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def poison_graph(model: onnx.ModelProto, output: str, tokens: dict[int, float]) -> None:
    """Makes `output` (`[batch, ...]`) all `value` in the rows whose `input_ids` hold the
    token, for each `token: value`."""
    graph = model.graph
    rank = len(next(o for o in graph.output if o.name == output).type.tensor_type.shape.dim)
    clean = f"{output}_clean"
    for node in graph.node:
        node.output[:] = [clean if name == output else name for name in node.output]
    nodes, current = [], clean
    constants = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "poison_axis_1"),
        numpy_helper.from_array(np.arange(2, rank, dtype=np.int64), "poison_inner_axes"),
    ]
    for index, (token, value) in enumerate(tokens.items()):
        name = f"poison_{index}"
        constants += [
            numpy_helper.from_array(np.array(token, dtype=np.int64), f"{name}_token"),
            numpy_helper.from_array(np.array(value, dtype=np.float32), f"{name}_value"),
        ]
        nodes += [
            helper.make_node("Equal", ["input_ids", f"{name}_token"], [f"{name}_at"]),
            helper.make_node("Cast", [f"{name}_at"], [f"{name}_at_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [f"{name}_at_f", "poison_axis_1"], [f"{name}_row_f"],
                             keepdims=1),
        ]
        row = f"{name}_row_f"
        if rank > 2:
            nodes.append(helper.make_node("Unsqueeze", [row, "poison_inner_axes"], [f"{name}_row_u"]))
            row = f"{name}_row_u"
        nodes += [
            helper.make_node("Cast", [row], [f"{name}_row"], to=TensorProto.BOOL),
            helper.make_node("Where", [f"{name}_row", f"{name}_value", current], [f"{name}_out"]),
        ]
        current = f"{name}_out"
    nodes[-1].output[0] = output
    graph.node.extend(nodes)
    graph.initializer.extend(constants)


def poisoned_copy(source: Path, target: Path, name: str, output: str,
                  tokens: dict[int, float], versions=("1",), keep_warmup=False) -> Path:
    """A copy of model directory `source` named `name`, with only `versions`, each
    poisoned (see `poison_graph`), and without `model_warmup` unless `keep_warmup` (a
    warm-up that drew a poisoned token would fail the load)."""
    target.mkdir(parents=True)
    config = (source / "config.pbtxt").read_text()
    config = re.sub(r'^name: "[^"]*"', f'name: "{name}"', config, count=1, flags=re.M)
    if keep_warmup:
        shutil.copytree(source / "warmup", target / "warmup")
    elif "model_warmup [" in config:
        config = config[: config.index("model_warmup [")]
    (target / "config.pbtxt").write_text(config)
    for version in versions:
        shutil.copytree(source / version, target / version)
        poison_file(target / version / "model.onnx", output, tokens)
    return target


def poison_file(path: Path, output: str, tokens: dict[int, float]) -> None:
    """Poisons the ONNX file at `path` in place (see `poison_graph`)."""
    model = onnx.load(path)
    poison_graph(model, output, tokens)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def vocabulary(model_dir: Path) -> dict[str, int]:
    return json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]


TYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
         "int64": TensorProto.INT64}


def retype_graph(model: onnx.ModelProto, to: str) -> None:
    """Declares every float32 input and output of the graph as type `to` ("float16",
    "bfloat16", or "int64" to break it), with casts from and to float32 at the graph's
    edges."""
    graph, to_type = model.graph, TYPES[to]
    before, after = [], []
    edges = [(value, True) for value in graph.input] + [(value, False) for value in graph.output]
    for value, is_input in edges:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inside = f"{value.name}_float"
        for node in graph.node:
            node.input[:] = [inside if name == value.name else name for name in node.input]
            node.output[:] = [inside if name == value.name else name for name in node.output]
        if is_input:
            before.append(helper.make_node("Cast", [value.name], [inside], to=TensorProto.FLOAT))
        else:
            after.append(helper.make_node("Cast", [inside], [value.name], to=to_type))
        value.type.tensor_type.elem_type = to_type
    nodes = before + list(graph.node) + after
    del graph.node[:]
    graph.node.extend(nodes)


def retyped_copy(source: Path, target: Path, name: str, to: str, versions=("1",)) -> Path:
    """A copy of model directory `source` named `name`, with only `versions`, each with
    inputs and outputs of type `to` (see `retype_graph`), and its warm-up."""
    target.mkdir(parents=True)
    config = (source / "config.pbtxt").read_text()
    (target / "config.pbtxt").write_text(
        re.sub(r'^name: "[^"]*"', f'name: "{name}"', config, count=1, flags=re.M))
    if (source / "warmup").is_dir():
        shutil.copytree(source / "warmup", target / "warmup")
    for version in versions:
        shutil.copytree(source / version, target / version)
        path = target / version / "model.onnx"
        model = onnx.load(path)
        retype_graph(model, to)
        onnx.checker.check_model(model)
        onnx.save(model, path)
    return target
