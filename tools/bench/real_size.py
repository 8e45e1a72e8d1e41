"""Random-weight models of real size, built without torch (onnx.helper + numpy), so the
throughput and memory measured on them say something about real deployments. Each is a
model directory for the backend, its config.pbtxt rendered by the export tools:

- `encoder-base` (feature-extraction): a BERT-base-shaped encoder, 12 layers, width 768,
  12 heads, feed-forward 3072, vocabulary 30522, 512 positions (110M parameters),
  inputs input_ids / attention_mask / token_type_ids, output last_hidden_state;
- `classifier-base` (sentiment-classifier): the same body with a RoBERTa-style head (the
  first token, dense + tanh, then 3 labels), output logits;
- `gpt2-base` (text-generation): a GPT-2-shaped decoder with past key values, 12 layers,
  width 768, 12 heads, vocabulary 50257, context 1024 (124M parameters), pre-norm, the
  output projection tied to the token embeddings, inputs input_ids / attention_mask /
  position_ids / past_key_values.{i}.key|value, outputs logits / present.{i}.key|value.

The encoders' texts are tokenized with the bundled bert-base tokenizer (its ids fit any
vocabulary of at least 1648), the decoder's prompts with GPT-2's own byte-level BPE
(tests/fixtures/gpt2-tokenizer). Weights are normal(0, 0.02) from a fixed seed; the
answers mean nothing, the shapes and the work are those of the real models.

    python tools/bench/real_size.py OUT_REPOSITORY [--layers 12 --hidden 768 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools" / "export"))
from repository_layout import CONFIG, WARMUP_FILE, model_files  # noqa: E402

TOKENIZER = REPO_ROOT / "model-repository" / "bert-base" / "1" / "tokenizer.json"
GPT2_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "gpt2-tokenizer" / "tokenizer.json"
GPT2_EOS = 50256
LABELS = {"0": "negative", "1": "neutral", "2": "positive"}
TASKS = {"encoder-base": "feature-extraction", "classifier-base": "sentiment-classifier",
         "gpt2-base": "text-generation"}


class Graph:
    """Nodes and random initializers of one ONNX graph, named as they are added."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def weight(self, *shape: int, value: float | None = None) -> str:
        name = f"w{len(self.initializers)}"
        if value is None:
            data = self.rng.normal(0.0, 0.02, shape).astype(np.float32)
        else:
            data = np.full(shape, value, dtype=np.float32)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def constant(self, values, dtype=np.int64) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        self.count += 1
        output = f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def linear(self, x: str, inputs: int, outputs: int) -> str:
        return self.op("Add", self.op("MatMul", x, self.weight(inputs, outputs)),
                       self.weight(outputs, value=0.0))

    def layer_norm(self, x: str, width: int) -> str:
        return self.op("LayerNormalization", x, self.weight(width, value=1.0),
                       self.weight(width, value=0.0), axis=-1, epsilon=1e-12)

    def gelu(self, x: str) -> str:
        """GELU, erf form: x * 0.5 * (1 + erf(x / sqrt(2)))."""
        return self.op("Mul", self.op("Mul", x, self.constant(0.5, np.float32)),
                       self.op("Add", self.constant(1.0, np.float32),
                               self.op("Erf", self.op("Div", x, self.constant(math.sqrt(2.0), np.float32)))))


def encoder_body(graph: Graph, layers: int, hidden: int, heads: int, ffn: int, vocab: int,
                 positions: int) -> str:
    """Embeddings and `layers` post-norm transformer layers; returns [B, S, hidden]."""
    head = hidden // heads
    length = graph.op("Gather", graph.op("Shape", "input_ids"), graph.constant(1), axis=0)
    position_ids = graph.op("Range", graph.constant(0), length, graph.constant(1))
    embedded = graph.op(
        "Add",
        graph.op("Add", graph.op("Gather", graph.weight(vocab, hidden), "input_ids"),
                 graph.op("Gather", graph.weight(positions, hidden), position_ids)),
        graph.op("Gather", graph.weight(2, hidden), "token_type_ids"),
    )
    x = graph.layer_norm(embedded, hidden)
    # 0 where attended, -10000 where padded: [B, 1, 1, S].
    mask = graph.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    bias = graph.op("Mul", graph.op("Sub", graph.constant(1.0, np.float32), mask),
                    graph.constant(-10000.0, np.float32))
    bias = graph.op("Unsqueeze", bias, graph.constant([1, 2]))
    split_heads = graph.constant([0, 0, heads, head])
    merge_heads = graph.constant([0, 0, hidden])
    scale = graph.constant(1.0 / math.sqrt(head), np.float32)
    for _ in range(layers):
        def heads_of(projection: str, perm: list[int]) -> str:
            return graph.op("Transpose", graph.op("Reshape", projection, split_heads), perm=perm)

        q = heads_of(graph.linear(x, hidden, hidden), [0, 2, 1, 3])
        k = heads_of(graph.linear(x, hidden, hidden), [0, 2, 3, 1])
        v = heads_of(graph.linear(x, hidden, hidden), [0, 2, 1, 3])
        scores = graph.op("Add", graph.op("Mul", graph.op("MatMul", q, k), scale), bias)
        context = graph.op("MatMul", graph.op("Softmax", scores, axis=-1), v)
        context = graph.op("Reshape", graph.op("Transpose", context, perm=[0, 2, 1, 3]), merge_heads)
        x = graph.layer_norm(graph.op("Add", x, graph.linear(context, hidden, hidden)), hidden)
        gelu = graph.gelu(graph.linear(x, hidden, ffn))
        x = graph.layer_norm(graph.op("Add", x, graph.linear(gelu, ffn, hidden)), hidden)
    return x


def decoder(layers: int, hidden: int, heads: int, vocab: int, positions: int,
            seed: int = 0) -> onnx.ModelProto:
    """A GPT-2-shaped decoder with past key values, as the text-generation task feeds it:
    the new tokens attend to the past ones and, causally, to each other, where
    attention_mask [B, past + new] allows."""
    graph = Graph(seed)
    head = hidden // heads
    token_embeddings = graph.weight(vocab, hidden)
    x = graph.op("Add", graph.op("Gather", token_embeddings, "input_ids"),
                 graph.op("Gather", graph.weight(positions, hidden), "position_ids"))
    new = graph.op("Gather", graph.op("Shape", "input_ids"), graph.constant(1), axis=0)
    total = graph.op("Gather", graph.op("Shape", "attention_mask"), graph.constant(1), axis=0)
    past = graph.op("Sub", total, new)
    # Query i (at position past + i) sees key j where j <= past + i and the mask is 1:
    # 0 there, -10000 elsewhere, [B, 1, new, past + new].
    keys = graph.op("Unsqueeze", graph.op("Range", graph.constant(0), total, graph.constant(1)),
                    graph.constant([0]))
    queries = graph.op("Unsqueeze", graph.op("Add", graph.op("Range", graph.constant(0), new,
                                                             graph.constant(1)), past),
                       graph.constant([1]))
    causal = graph.op("LessOrEqual", keys, queries)
    padded = graph.op("Unsqueeze", graph.op("Cast", "attention_mask", to=TensorProto.BOOL),
                      graph.constant([1, 2]))
    allowed = graph.op("And", graph.op("Unsqueeze", causal, graph.constant([0, 1])), padded)
    bias = graph.op("Where", allowed, graph.constant(0.0, np.float32),
                    graph.constant(-10000.0, np.float32))
    split_heads = graph.constant([0, 0, heads, head])
    merge_heads = graph.constant([0, 0, hidden])
    scale = graph.constant(1.0 / math.sqrt(head), np.float32)
    outputs = []
    for layer in range(layers):
        def heads_of(projection: str) -> str:
            return graph.op("Transpose", graph.op("Reshape", projection, split_heads), perm=[0, 2, 1, 3])

        normed = graph.layer_norm(x, hidden)
        q = heads_of(graph.linear(normed, hidden, hidden))
        k = graph.op("Concat", f"past_key_values.{layer}.key", heads_of(graph.linear(normed, hidden, hidden)), axis=2)
        v = graph.op("Concat", f"past_key_values.{layer}.value", heads_of(graph.linear(normed, hidden, hidden)), axis=2)
        for part, value in (("key", k), ("value", v)):
            graph.nodes.append(helper.make_node("Identity", [value], [f"present.{layer}.{part}"]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{layer}.{part}", TensorProto.FLOAT, ["batch", heads, "total", head]))
        scores = graph.op("Add", graph.op("Mul", graph.op("MatMul", q, graph.op("Transpose", k, perm=[0, 1, 3, 2])),
                                          scale), bias)
        context = graph.op("MatMul", graph.op("Softmax", scores, axis=-1), v)
        context = graph.op("Reshape", graph.op("Transpose", context, perm=[0, 2, 1, 3]), merge_heads)
        x = graph.op("Add", x, graph.linear(context, hidden, hidden))
        inner = graph.gelu(graph.linear(graph.layer_norm(x, hidden), hidden, 4 * hidden))
        x = graph.op("Add", x, graph.linear(inner, 4 * hidden, hidden))
    x = graph.layer_norm(x, hidden)
    # The output projection is the token embeddings, transposed (tied, as in GPT-2).
    rows = graph.op("Reshape", x, graph.constant([-1, hidden]))
    logits = graph.op("Gemm", rows, token_embeddings, transB=1)
    shape = graph.op("Concat", graph.op("Slice", graph.op("Shape", "input_ids"), graph.constant([0]),
                                        graph.constant([2])), graph.constant([vocab]), axis=0)
    graph.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"]))
    tokens = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, tokens),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, tokens)]
    for layer in range(layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{layer}.{part}", TensorProto.FLOAT, ["batch", heads, "past", head]))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*tokens, vocab]))
    model = helper.make_model(
        helper.make_graph(graph.nodes, "text-generation-random", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="triton-rust tools/bench/real_size.py",
    )
    onnx.checker.check_model(model)
    return model


def build(task: str, layers: int, hidden: int, heads: int, ffn: int, vocab: int,
          positions: int, seed: int = 0) -> onnx.ModelProto:
    graph = Graph(seed)
    x = encoder_body(graph, layers, hidden, heads, ffn, vocab, positions)
    tokens = ["batch", "sequence"]
    if task == "feature-extraction":
        graph.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
        output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                               [*tokens, hidden])
    else:
        first = graph.op("Gather", x, graph.constant(0), axis=1)
        pooled = graph.op("Tanh", graph.linear(first, hidden, hidden))
        logits = graph.linear(pooled, hidden, len(LABELS))
        graph.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, tokens)
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    model = helper.make_model(
        helper.make_graph(graph.nodes, f"{task}-random", inputs, [output], graph.initializers),
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="triton-rust tools/bench/real_size.py",
    )
    onnx.checker.check_model(model)
    return model


def write_model(repository: Path, name: str, task: str, args) -> Path:
    """`repository/name/` with config.pbtxt, its warm-up file and version 1."""
    if task == "text-generation":
        model = decoder(args.layers, args.hidden, args.heads, args.gpt2_vocab, args.context)
        hf_config = {"model_type": "gpt2", "n_positions": args.context, "eos_token_id": GPT2_EOS}
        tokenizer_file = GPT2_TOKENIZER
    else:
        model = build(task, args.layers, args.hidden, args.heads, args.ffn, args.vocab, args.positions)
        hf_config = {"model_type": "bert", "hidden_size": args.hidden,
                     "max_position_embeddings": args.positions, "id2label": LABELS}
        tokenizer_file = TOKENIZER
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    directory = repository / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "1" / "model.onnx")
    shutil.copyfile(tokenizer_file, directory / "1" / "tokenizer.json")
    for path, data in model_files(name, task, hf_config, tokenizer).items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    assert (directory / CONFIG).is_file() and (directory / WARMUP_FILE).is_file()
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--gpt2-vocab", type=int, default=50257)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    for name in args.models:
        directory = write_model(args.repository, name, TASKS[name], args)
        size = (directory / "1" / "model.onnx").stat().st_size / 2**20
        print(f"wrote {directory} ({size:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
