"""What the Python-backend peers share: their config's parameters, and ONNX Runtime and
the tokenizer on the served version's files, with the threads our models use (one
intra-op, one inter-op). tools/bench/serving.py puts this directory on the peers'
`site_packages`."""

import json
from pathlib import Path


def open_model(args):
    """(parameters, ONNX Runtime session, tokenizer without padding) for the Python
    backend's `initialize(args)`."""
    config = json.loads(args["model_config"])
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    import onnxruntime as ort
    from tokenizers import Tokenizer

    version_dir = Path(args["model_repository"]) / args["model_version"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tokenizer.no_padding()
    return parameters, session, tokenizer

