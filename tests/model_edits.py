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
from typing import Callable

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


def edited_copy(source: Path, target: Path, name: str, edit: Callable[[onnx.ModelProto], None],
                keep_warmup=True) -> Path:
    """A copy of model directory `source` named `name`, with only version 1, its graph
    changed by `edit`; its warm-up is kept (where it has one) unless not `keep_warmup`,
    which drops `model_warmup`."""
    target.mkdir(parents=True)
    config = (source / "config.pbtxt").read_text()
    config = re.sub(r'^name: "[^"]*"', f'name: "{name}"', config, count=1, flags=re.M)
    if keep_warmup and (source / "warmup").is_dir():
        shutil.copytree(source / "warmup", target / "warmup")
    elif not keep_warmup and "model_warmup [" in config:
        config = config[: config.index("model_warmup [")]
    (target / "config.pbtxt").write_text(config)
    shutil.copytree(source / "1", target / "1")
    edit_file(target / "1" / "model.onnx", edit)
    return target


def edit_file(path: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Changes the ONNX file at `path` in place by `edit`, and checks the result."""
    model = onnx.load(path)
    edit(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def poisoned_copy(source: Path, target: Path, name: str, output: str,
                  tokens: dict[int, float], keep_warmup=False) -> Path:
    """`edited_copy` with `poison_graph`, without `model_warmup` unless `keep_warmup` (a
    warm-up that drew a poisoned token would fail the load)."""
    return edited_copy(source, target, name, lambda model: poison_graph(model, output, tokens),
                       keep_warmup=keep_warmup)


def poison_file(path: Path, output: str, tokens: dict[int, float]) -> None:
    """Poisons the ONNX file at `path` in place (see `poison_graph`)."""
    edit_file(path, lambda model: poison_graph(model, output, tokens))


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


def retyped_copy(source: Path, target: Path, name: str, to: str) -> Path:
    """`edited_copy` with `retype_graph` to type `to`, its warm-up kept."""
    return edited_copy(source, target, name, lambda model: retype_graph(model, to))
