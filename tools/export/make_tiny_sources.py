#!/usr/bin/env python3
"""Write tiny Hugging Face model directories to run export_models.py end to end offline.

    python tools/export/make_tiny_sources.py OUT_DIR

For each model of the example repository it writes OUT_DIR/<model>/ with
`save_pretrained` of a model and a tokenizer, as the hub would serve them: the random
weights of version 1 of the test models (tools/fixtures/make_test_models.py, same
configuration and seed) and the committed tokenizer.json of that version. Exporting them
with `export_models.py MODEL --source OUT_DIR/MODEL` must therefore serve the answers in
tests/reference/ for version 1. Needs tools/export/requirements.txt; no network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "fixtures"))

import make_test_models as fixtures  # noqa: E402

# Special tokens of the fixture tokenizers, as transformers names them.
SPECIAL_TOKENS = {
    "sentiment-classifier": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    },
    "bert-base": {
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
    },
    "gpt2-small": {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
}


def tiny_model(name: str, tokenizer):
    """Version 1 of the test model `name`, rebuilt from its configuration and seed."""
    vocab = len(tokenizer)
    seed = fixtures.SEEDS[name]["1"]
    if name == "sentiment-classifier":
        return fixtures.make_classifier(vocab, seed)
    if name == "bert-base":
        return fixtures.make_bert(vocab, seed)
    return fixtures.make_gpt2(vocab, tokenizer.convert_tokens_to_ids("<|endoftext|>"), seed)


def write_source(name: str, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = fixtures.MODEL_REPO / name / "1" / "tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **SPECIAL_TOKENS[name])
    tokenizer.save_pretrained(out)
    tiny_model(name, tokenizer).save_pretrained(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", type=Path, help="directory to write one source directory per model into"
    )
    args = parser.parse_args()
    for name in fixtures.ALL_MODELS:
        write_source(name, args.out / name)


if __name__ == "__main__":
    main()
