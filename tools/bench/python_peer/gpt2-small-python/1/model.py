"""The Python-backend peer of `gpt2-small`: what a competent user writes with Triton's
Python backend instead of ours, on the same ONNX decoder and tokenizer (copied beside
this file by tools/bench/serving.py): `tokenizers` for the prompts, all requests of an
execute call in one left-padded batch, one prefill then one cached step per new token
through `onnxruntime` (the same 1.31.1, the same threads: one intra-op, one inter-op),
sampling with the config's temperature in numpy, until every row has ended (end of text,
or max_new_tokens: the config's, or the request parameter's). It answers prompt +
continuation, as gpt2-small does."""

import json
import sys

import triton_python_backend_utils as pb_utils

END_OF_TEXT = "<|endoftext|>"


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
        self.tokenizer.no_truncation()
        self.eos = self.tokenizer.token_to_id(END_OF_TEXT)
        self.context = int(parameters["max_sequence_length"])
        self.max_new_tokens = int(parameters["max_new_tokens"])
        self.temperature = float(parameters["temperature"])
        self.do_sample = parameters["do_sample"] == "true"
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_shape = {i.name: i.shape for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.rng = np.random.default_rng()

    def choose(self, logits):
        """One token per row: sampled at the temperature, or the most likely."""
        if not self.do_sample:
            return logits.argmax(axis=1)
        scaled = logits / self.temperature
        probabilities = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        cumulative = np.cumsum(probabilities, axis=1)
        draws = self.rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
        return (cumulative < draws).sum(axis=1)

    def generate(self, prompts, limits):
        """The texts of `prompts`, each with at most its limit of new tokens; the prompts
        keep their last tokens, so that the longest limit fits in the context."""
        limits = np.minimum(np.array(limits), self.context - 1)
        new_tokens = int(limits.max())
        rows = [encoding.ids[-(self.context - new_tokens):] for encoding in self.tokenizer.encode_batch(prompts)]
        batch, longest = len(rows), max(len(row) for row in rows)
        ids = np.full((batch, longest), self.eos, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for index, row in enumerate(rows):
            ids[index, longest - len(row):] = row
            mask[index, longest - len(row):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        past = {}
        for name in self.past_names:
            _, heads, _, width = self.past_shape[name]
            past[name] = np.zeros((batch, heads, 0, width), dtype=np.float32)
        generated = np.zeros((batch, 0), dtype=np.int64)
        ended = np.zeros(batch, dtype=bool)
        for step in range(new_tokens):
            outputs = self.session.run(
                self.output_names,
                {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past},
            )
            named = dict(zip(self.output_names, outputs))
            tokens = np.where(ended, self.eos, self.choose(named["logits"][:, -1, :]))
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            ended |= (tokens == self.eos) | (step + 1 >= limits)
            if ended.all():
                break
            ids = tokens[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            past = {name: named[name.replace("past_key_values.", "present.")] for name in self.past_names}
        texts = []
        for prompt, row in zip(prompts, generated):
            row = list(row)
            row = row[: row.index(self.eos)] if self.eos in row else row
            texts.append(prompt + self.tokenizer.decode(row))
        return texts

    def execute(self, requests):
        prompts, counts, limits = [], [], []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            decoded = [text.decode("utf-8") for text in tensor.reshape(-1)]
            limit = int(json.loads(request.parameters()).get("max_new_tokens", self.max_new_tokens))
            prompts.extend(decoded)
            counts.append(len(decoded))
            limits.extend([limit] * len(decoded))
        texts = np.array(self.generate(prompts, limits), dtype=np.object_)
        responses, start = [], 0
        for count in counts:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("generated_text", texts[start:start + count]),
            ]))
            start += count
        return responses
