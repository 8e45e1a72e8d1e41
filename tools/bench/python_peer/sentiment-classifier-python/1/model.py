"""The Python-backend peer of `sentiment-classifier`: what a competent user writes with
Triton's Python backend instead of ours, on the same ONNX file and tokenizer (copied
beside this file by tools/bench/serving.py): `tokenizers` for the texts, all requests of
an execute call in one padded batch, `onnxruntime` (the same 1.31.1) with the same
threads (one intra-op, one inter-op), softmax and the label in numpy."""

import json
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The stub's Python ignores PYTHONPATH: onnxruntime, tokenizers and peer_common
        # come from the config's site_packages.
        config = json.loads(args["model_config"])
        sys.path[:0] = config["parameters"]["site_packages"]["string_value"].split(":")
        global np
        import numpy as np
        from peer_common import open_model

        parameters, self.session, self.tokenizer = open_model(args)
        self.tokenizer.enable_truncation(int(parameters["max_sequence_length"]))
        self.pad_id = next(
            self.tokenizer.token_to_id(token)
            for token in ("<pad>", "[PAD]", "<|endoftext|>")
            if self.tokenizer.token_to_id(token) is not None
        )
        self.labels = np.array(parameters["labels"].split(","), dtype=np.object_)
        self.graph_inputs = {graph_input.name for graph_input in self.session.get_inputs()}

    def execute(self, requests):
        texts = []
        counts = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            decoded = [text.decode("utf-8") for text in tensor.reshape(-1)]
            texts.extend(decoded)
            counts.append(len(decoded))
        encodings = self.tokenizer.encode_batch(texts)
        longest = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(texts), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), longest), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.graph_inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (logits,) = self.session.run(["logits"], feeds)
        exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)
        labels = self.labels[scores.argmax(axis=1)]
        responses = []
        start = 0
        for count in counts:
            end = start + count
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("sentiment_score", scores[start:end]),
                pb_utils.Tensor("sentiment_label", labels[start:end]),
            ]))
            start = end
        return responses
