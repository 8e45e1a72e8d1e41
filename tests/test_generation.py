"""Text generation (task `text-generation`, model gpt2-small) through a real tritonserver.

Greedy results are compared exactly with tests/reference/gpt2-small.json, computed by
Hugging Face transformers' greedy `generate` (20 new tokens per prompt, both versions).
Sampling cannot be compared with another implementation, so it is checked for what it
promises: a fixed seed reproduces, other seeds differ, and top_k=1 is greedy.

Request parameters travel as KServe `parameters` (JSON top level, gRPC InferRequest
parameters, tritonclient's `parameters=`). Everything runs on the session `server`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from clients import Clients
from conftest import MODEL_REPOSITORY, assert_error, load_reference, text_input

MODEL = "gpt2-small"
VERSIONS = ("1", "2")
PROTOCOLS = ("json", "binary", "grpc")
REFERENCE = load_reference(MODEL)
CONTEXT = REFERENCE["n_positions"]  # max_sequence_length in config.pbtxt
REFERENCE_TOKENS = REFERENCE["max_new_tokens"]
GREEDY = {"do_sample": False, "max_new_tokens": REFERENCE_TOKENS}
LONG_PROMPT = "word " * 400  # far more than CONTEXT tokens


def cases(version: str) -> list[dict]:
    return REFERENCE["versions"][version]


def expected_text(ref: dict) -> str:
    return ref["prompt"] + ref["new_text"]


# --- an independent byte-level BPE decoder (tokenizer.json of the model) ----------------
#
# GPT-2's decoding is a plain lookup: token string -> bytes (the bytes_to_unicode table),
# then lossy UTF-8. It lets the suite know the exact text of the first k reference tokens.


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


_BYTE_OF_CHAR = {char: byte for byte, char in _bytes_to_unicode().items()}
_TOKENIZER = json.loads((MODEL_REPOSITORY / MODEL / "1" / "tokenizer.json").read_text())
_TOKEN_OF_ID = {index: token for token, index in _TOKENIZER["model"]["vocab"].items()}


def decode_ids(ids) -> str:
    data = bytes(_BYTE_OF_CHAR[char] for index in ids for char in _TOKEN_OF_ID[index])
    return data.decode("utf-8", errors="replace")


# --- requests over the three protocols ---------------------------------------------------


def infer_path(version: str | None) -> str:
    return f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"


def generate_request(server, prompts, version=None, **parameters):
    """POST one KServe JSON request; returns the requests.Response."""
    body = {"inputs": [text_input(prompts)]}
    if parameters:
        body["parameters"] = parameters
    return server.post(infer_path(version), body)


def generated(response, count: int | None = None) -> list[str]:
    """The generated_text strings of a successful JSON response."""
    assert response.status_code == 200, (response.status_code, response.text[:2000])
    result = response.json()
    assert result["model_name"] == MODEL
    (output,) = result["outputs"]
    assert output["name"] == "generated_text" and output["datatype"] == "BYTES", output
    if count is not None:
        assert output["shape"] == [count], output["shape"]
    assert len(output["data"]) == output["shape"][0]
    return output["data"]


def generate(server, prompts, version=None, **parameters) -> list[str]:
    prompts = list(prompts)
    return generated(generate_request(server, prompts, version, **parameters), len(prompts))


class GenerationClients(Clients):
    """The shared protocol clients, with a call that returns the generated texts."""

    def __init__(self, server):
        super().__init__(server, {MODEL: ("generated_text",)})

    def generate(self, protocol, prompts, version=None, **parameters) -> list[str]:
        prompts = np.array(list(prompts), dtype=object)
        outputs = self.infer(
            protocol, MODEL, version, {"text_input": prompts}, ["generated_text"], parameters
        )
        array = outputs["generated_text"]
        assert array.shape == (len(prompts),), array.shape
        return list(array)


@pytest.fixture(scope="module")
def clients(server):
    c = GenerationClients(server)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def healthy_afterwards(server):
    yield
    assert server.is_healthy(), server.log()[-5000:]


# --- 0. the reference itself --------------------------------------------------------------


def test_reference_is_consistent():
    assert REFERENCE["eos_token_id"] == 0 and REFERENCE_TOKENS == 20
    for version in VERSIONS:
        assert len(cases(version)) >= 3
        for ref in cases(version):
            assert set(ref) >= {"prompt", "input_ids", "new_token_ids", "text", "new_text"}
            assert ref["text"] == ref["prompt"] + ref["new_text"], ref["prompt"]
            assert len(ref["new_token_ids"]) == REFERENCE_TOKENS
            assert REFERENCE["eos_token_id"] not in ref["new_token_ids"]
            # The suite's decoder agrees with transformers' on every reference.
            assert decode_ids(ref["new_token_ids"]) == ref["new_text"], ref["prompt"]


# --- 1. the seed payload and the config defaults ----------------------------------------


def test_seed_payload_unchanged(server):
    prompt = "Once upon a time"
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [prompt]}]}
    response = server.post(f"/v2/models/{MODEL}/infer", body)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "2"
    (text,) = generated(response, 1)
    assert text.startswith(prompt)


def test_config_defaults(server):
    """Defaults: 50 new tokens, temperature 0.7, sampling on (checked with a fixed seed)."""
    prompt = "Hello"
    seed = {"seed": 11}
    (default,) = generate(server, [prompt], **seed)
    assert default.startswith(prompt)
    explicit = dict(seed, max_new_tokens=50, temperature=0.7, do_sample=True)
    assert generate(server, [prompt], **explicit) == [default]
    assert generate(server, [prompt], **dict(explicit, max_new_tokens=49)) != [default]
    assert generate(server, [prompt], **dict(explicit, temperature=1.3)) != [default]
    (greedy,) = generate(server, [prompt], do_sample=False, max_new_tokens=50)
    assert greedy != default
    assert greedy.startswith(expected_text(cases("2")[-1]))  # "Hello" of version 2


# --- 2. greedy generation equals transformers' -------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_matches_reference(clients, version, protocol):
    for ref in cases(version):
        (text,) = clients.generate(protocol, [ref["prompt"]], version, **GREEDY)
        assert text == expected_text(ref) == ref["text"], ref["prompt"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_batch_in_one_request(clients, version, protocol):
    """All prompts in one request (left-padded inside the backend) answer as one by one."""
    refs = cases(version)
    texts = clients.generate(protocol, [ref["prompt"] for ref in refs], version, **GREEDY)
    assert texts == [expected_text(ref) for ref in refs]
    # Reversed order and a repeated prompt: each row is its own.
    refs = refs[::-1] + refs[:1]
    texts = clients.generate(protocol, [ref["prompt"] for ref in refs], version, **GREEDY)
    assert texts == [expected_text(ref) for ref in refs]


def test_unknown_parameters_are_ignored(server):
    ref = cases("1")[0]
    extra = {"foo": "bar", "beam_width": 4, "length_penalty": 1.5, "flag": True}
    assert generate(server, [ref["prompt"]], "1", **GREEDY, **extra) == [expected_text(ref)]


# --- 3. versions ---------------------------------------------------------------------------


def test_versions_differ_and_unversioned_is_latest(server):
    prompts = [ref["prompt"] for ref in cases("1")]
    assert prompts == [ref["prompt"] for ref in cases("2")]
    first = generate(server, prompts, "1", **GREEDY)
    second = generate(server, prompts, "2", **GREEDY)
    assert any(a != b for a, b in zip(first, second))
    response = generate_request(server, prompts, None, **GREEDY)
    assert response.json()["model_version"] == "2"
    assert generated(response, len(prompts)) == second


# --- 4. sampling ------------------------------------------------------------------------------


SAMPLED = {"do_sample": True, "temperature": 1.0, "max_new_tokens": REFERENCE_TOKENS}


@pytest.mark.parametrize("version", VERSIONS)
def test_fixed_seed_reproduces(clients, version):
    prompts = [ref["prompt"] for ref in cases(version)]
    first = clients.generate("json", prompts, version, seed=1234, **SAMPLED)
    for protocol in PROTOCOLS:
        assert clients.generate(protocol, prompts, version, seed=1234, **SAMPLED) == first
    for prompt, text in zip(prompts, first):
        assert text.startswith(prompt) and len(text) > len(prompt)
    # An integer temperature is the same number as a floating-point one.
    params = dict(SAMPLED, temperature=1)
    assert clients.generate("json", prompts, version, seed=1234, **params) == first
    # Sampling is not greedy.
    assert first != [expected_text(ref) for ref in cases(version)]


def test_different_seeds_differ(server):
    prompt = "The weather today is"
    outputs = {seed: generate(server, [prompt], "2", seed=seed, **SAMPLED)[0] for seed in range(6)}
    assert all(text.startswith(prompt) for text in outputs.values())
    assert len(set(outputs.values())) >= 5, outputs


def test_unseeded_requests_differ(server):
    prompt = "Once upon a time"
    outputs = [generate(server, [prompt], "1", **SAMPLED)[0] for _ in range(4)]
    assert all(text.startswith(prompt) for text in outputs)
    assert len(set(outputs)) >= 3, outputs


@pytest.mark.parametrize("version", VERSIONS)
def test_top_k_one_and_tiny_top_p_are_greedy(server, version):
    refs = cases(version)
    prompts = [ref["prompt"] for ref in refs]
    expected = [expected_text(ref) for ref in refs]
    for seed in (0, 99):
        for narrow in ({"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}):
            params = dict(SAMPLED, temperature=0.7, seed=seed, **narrow)
            assert generate(server, prompts, version, **params) == expected, narrow


def test_top_k_and_top_p_restrict_sampling(server):
    """Wide settings sample; top_k 0 means no top-k limit (same as leaving it out)."""
    prompt = "In 2024 the company"
    base = dict(SAMPLED, seed=5)
    (free,) = generate(server, [prompt], "1", **base)
    assert generate(server, [prompt], "1", top_k=0, top_p=1.0, **base) == [free]
    (top_k,) = generate(server, [prompt], "1", top_k=3, **base)
    assert top_k.startswith(prompt)
    (top_p,) = generate(server, [prompt], "1", top_p=0.5, **base)
    assert top_p.startswith(prompt)


def test_repetition_penalty(server):
    ref = cases("1")[0]  # greedy repeats " ugly" many times
    prompt = ref["prompt"]
    assert generate(server, [prompt], "1", repetition_penalty=1.0, **GREEDY) == [expected_text(ref)]
    (penalised,) = generate(server, [prompt], "1", repetition_penalty=2.0, **GREEDY)
    assert penalised.startswith(prompt) and penalised != expected_text(ref)
    assert penalised.count(" ugly") < expected_text(ref).count(" ugly")
    assert generate(server, [prompt], "1", repetition_penalty=2.0, **GREEDY) == [penalised]


# --- 5. max_new_tokens and the context ------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_max_new_tokens_bounds_new_tokens(server, version):
    for ref in cases(version):
        shorter = None
        for count in (1, 5, 13):
            params = dict(GREEDY, max_new_tokens=count)
            (text,) = generate(server, [ref["prompt"]], version, **params)
            assert text == ref["prompt"] + decode_ids(ref["new_token_ids"][:count]), (
                ref["prompt"],
                count,
            )
            if count == 5:
                shorter = text
        full = expected_text(ref)
        if full.isascii():  # string prefixes hold where no character spans tokens
            assert full.startswith(shorter) and len(shorter) < len(full)


def test_generation_stops_at_the_context(server):
    """Prompt plus new tokens never exceed the 128-token context."""
    ref = cases("1")[-1]
    assert ref["prompt"] == "Hello"
    room = CONTEXT - len(ref["input_ids"])
    (at_most,) = generate(server, [ref["prompt"]], "1", do_sample=False, max_new_tokens=CONTEXT)
    (room_tokens,) = generate(server, [ref["prompt"]], "1", do_sample=False, max_new_tokens=room)
    (one_less,) = generate(server, [ref["prompt"]], "1", do_sample=False, max_new_tokens=room - 1)
    assert at_most == room_tokens
    assert one_less != room_tokens and len(one_less) < len(room_tokens)
    for text in (at_most, one_less):
        assert text.startswith(expected_text(ref))


def test_overlong_prompt_is_truncated(server):
    """The prompt keeps its last tokens inside the backend; the answer repeats it whole,
    and only one token fits after the 127 kept ones."""
    one = generate(server, [LONG_PROMPT], "1", do_sample=False, max_new_tokens=1)
    most = generate(server, [LONG_PROMPT], "1", do_sample=False, max_new_tokens=CONTEXT)
    assert one == most
    assert one[0].startswith(LONG_PROMPT) and len(one[0]) > len(LONG_PROMPT)
    (sampled,) = generate(server, [LONG_PROMPT], "2")  # config defaults: 50 tokens, sampled
    assert sampled.startswith(LONG_PROMPT)
    assert len(sampled) - len(LONG_PROMPT) < 40  # one token, not 50


@pytest.mark.parametrize("max_new_tokens", [REFERENCE_TOKENS, CONTEXT])
def test_overlong_prompt_batched_with_short_ones(server, max_new_tokens):
    """A row that reached the context finishes; the others in its request go on and
    answer exactly as they would alone."""
    refs = cases("1")
    prompts = [LONG_PROMPT] + [ref["prompt"] for ref in refs]
    params = dict(GREEDY, max_new_tokens=max_new_tokens)
    alone = [generate(server, [prompt], "1", **params)[0] for prompt in prompts]
    if max_new_tokens == REFERENCE_TOKENS:
        assert alone[1:] == [expected_text(ref) for ref in refs]
    assert generate(server, prompts, "1", **params) == alone


# --- 6. stop strings ----------------------------------------------------------------------------


def stop_words(ref: dict) -> list[str]:
    """ASCII words of the greedy continuation, in order of appearance."""
    return [m.group() for m in re.finditer(r"[A-Za-z]{3,}", ref["new_text"])]


def cut(text: str, stops) -> str:
    return text[: min([text.find(s) for s in stops if s in text] or [len(text)])]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("version", VERSIONS)
def test_stop_string_cuts_the_output(clients, version, protocol):
    for ref in cases(version):
        stop = stop_words(ref)[1]
        expected = ref["prompt"] + cut(ref["new_text"], [stop])
        assert len(expected) < len(expected_text(ref))
        assert clients.generate(protocol, [ref["prompt"]], version, stop=stop, **GREEDY) == [
            expected
        ], (ref["prompt"], stop)


@pytest.mark.parametrize("version", VERSIONS)
def test_stop_list(server, version):
    for ref in cases(version):
        words = stop_words(ref)
        stops = [words[2], words[1], "\n"]  # cut before whichever comes first
        expected = ref["prompt"] + cut(ref["new_text"], stops)
        (text,) = generate(
            server, [ref["prompt"]], version, stop_sequences=json.dumps(stops), **GREEDY
        )
        assert text == expected, (ref["prompt"], stops)
        # A one-element list is the plain string.
        one = json.dumps([words[1]])
        (single,) = generate(server, [ref["prompt"]], version, stop_sequences=one, **GREEDY)
        assert single == ref["prompt"] + cut(ref["new_text"], [words[1]])


def test_stop_applies_to_each_row_and_only_to_new_text(server):
    refs = cases("2")
    prompts = [ref["prompt"] for ref in refs]
    # Never generated: the outputs are whole (a stop inside a prompt does not cut it).
    for stop in ("\n", "Zebra", "Hello"):
        assert generate(server, prompts, "2", stop=stop, **GREEDY) == [
            expected_text(ref) for ref in refs
        ], stop
    assert generate(
        server, prompts, "2", stop_sequences=json.dumps(["The", "time"]), **GREEDY
    ) == [expected_text(ref) for ref in refs]
    stop = stop_words(refs[0])[1]
    expected = [ref["prompt"] + cut(ref["new_text"], [stop]) for ref in refs]
    assert generate(server, prompts, "2", stop=stop, **GREEDY) == expected


# --- 7. bad requests ---------------------------------------------------------------------------


INVALID_PARAMETERS = {
    "negative-temperature": ({"temperature": -1.0}, "temperature"),
    "zero-temperature": ({"temperature": 0}, "temperature"),
    "text-temperature": ({"temperature": "hot"}, "temperature"),
    "top-p-zero": ({"top_p": 0}, "top_p"),
    "top-p-above-one": ({"top_p": 1.5}, "top_p"),
    "max-new-tokens-zero": ({"max_new_tokens": 0}, "max_new_tokens"),
    "max-new-tokens-huge": ({"max_new_tokens": 1000000}, "max_new_tokens"),
    "max-new-tokens-above-context": ({"max_new_tokens": CONTEXT + 1}, "max_new_tokens"),
    "max-new-tokens-negative": ({"max_new_tokens": -5}, "max_new_tokens"),
    "max-new-tokens-fraction": ({"max_new_tokens": 2.5}, "max_new_tokens"),
    "top-k-negative": ({"top_k": -1}, "top_k"),
    "seed-negative": ({"seed": -3}, "seed"),
    "repetition-penalty-zero": ({"repetition_penalty": 0}, "repetition_penalty"),
    "repetition-penalty-negative": ({"repetition_penalty": -1.2}, "repetition_penalty"),
    "do-sample-number": ({"do_sample": 1}, "do_sample"),
    "do-sample-word": ({"do_sample": "yes"}, "do_sample"),
    "stop-list-of-numbers": ({"stop_sequences": "[1,2]"}, "stop_sequences"),
    "stop-number": ({"stop": 7}, "stop"),
    "stop-empty": ({"stop": ""}, "stop"),
    "stop-bad-json": ({"stop_sequences": '["\\n", '}, "stop_sequences"),
    "stop-too-long": ({"stop": "x" * 257}, "stop"),
    "stop-too-many": ({"stop_sequences": json.dumps([str(i) for i in range(17)])}, "stop_sequences"),
    "stop-both-forms": ({"stop": "a", "stop_sequences": '["b"]'}, "stop_sequences"),
}


@pytest.mark.parametrize("case", INVALID_PARAMETERS, ids=str)
def test_invalid_parameter(server, case):
    parameters, name = INVALID_PARAMETERS[case]
    response = generate_request(server, ["Hello"], "1", **parameters)
    assert_error(response, f"'{name}'")
    # Valid parameters next to the bad one do not rescue it.
    response = generate_request(server, ["Hello"], "1", **{**GREEDY, **parameters})
    assert_error(response, f"'{name}'")


def test_invalid_parameter_over_grpc(clients):
    for parameters, name in [
        ({"temperature": -0.5}, "temperature"),
        ({"stop_sequences": "[1,2]"}, "stop_sequences"),
    ]:
        with pytest.raises(InferenceServerException) as raised:
            clients.generate("grpc", ["Hello"], "2", **parameters)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.status()
        assert f"'{name}'" in raised.value.message()
    # The gRPC channel and the model still work.
    ref = cases("2")[0]
    assert clients.generate("grpc", [ref["prompt"]], "2", **GREEDY) == [expected_text(ref)]


def raw_bytes_request(server, elements: list[bytes], version="1"):
    """text_input sent raw with the binary tensor extension (no client-side checks)."""
    payload = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text_input",
                    "datatype": "BYTES",
                    "shape": [len(elements)],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ],
            "parameters": GREEDY,
        }
    ).encode()
    return server.post(
        infer_path(version),
        data=header + payload,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )


BAD_PROMPTS = {
    "empty": ([b""], "element 0 is empty"),
    "whitespace": ([b" \n\t"], "element 0 is empty"),
    "empty-among-good": ([b"Hello", b""], "element 1 is empty"),
    "invalid-utf8": ([b"\xff\xfe"], "element 0 is not valid UTF-8"),
    "truncated-utf8-among-good": ([b"Hello", b"caf\xc3"], "element 1 is not valid UTF-8"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS, ids=str)
def test_bad_prompt(server, case):
    elements, fragment = BAD_PROMPTS[case]
    message = assert_error(raw_bytes_request(server, elements), fragment)
    assert "text_input" in message


def test_no_prompt_and_wrong_inputs(server):
    assert_error(server.post(infer_path("1"), {"inputs": [text_input([], shape=[0])]}), "prompt")
    wrong_type = {"name": "text_input", "datatype": "INT32", "shape": [1], "data": [1]}
    assert_error(server.post(infer_path("1"), {"inputs": [wrong_type]}), "text_input")
    wrong_name = text_input(["Hello"], name="prompt")
    assert server.post(infer_path("1"), {"inputs": [wrong_name]}).status_code == 400


def test_prompts_per_request_are_capped(server):
    """Each prompt costs its own KV cache: a request may hold 64 (the default of
    parameter max_prompts_per_request), not more."""
    assert len(generate(server, ["Hi"] * 64, "1", max_new_tokens=1)) == 64
    assert_error(
        generate_request(server, ["Hi"] * 65, "1", max_new_tokens=1),
        "65 prompts", "at most 64", "max_prompts_per_request",
    )


def test_serves_after_bad_requests(server):
    """Every bad request above left the model answering correctly."""
    for version in VERSIONS:
        ref = cases(version)[0]
        assert generate(server, [ref["prompt"]], version, **GREEDY) == [expected_text(ref)]


# --- 8. concurrency ----------------------------------------------------------------------------


def test_concurrent_requests_with_different_parameters(server, clients):
    jobs = []
    for version in VERSIONS:
        for ref in cases(version):
            jobs.append(("json", [ref["prompt"]], version, GREEDY, [expected_text(ref)]))
    sampled_settings = [
        {"seed": 1},
        {"seed": 2, "temperature": 1.2},
        {"seed": 3, "top_k": 20},
        {"seed": 4, "top_p": 0.8, "repetition_penalty": 1.3},
        {"seed": 5, "max_new_tokens": 7},
    ]
    prompts = [ref["prompt"] for ref in cases("1")]
    for i, settings in enumerate(sampled_settings):
        version = VERSIONS[i % 2]
        protocol = PROTOCOLS[i % 3]
        sequential = clients.generate(protocol, prompts, version, **settings)
        jobs.append((protocol, prompts, version, settings, sequential))
    start = threading.Barrier(len(jobs))

    def run(job):
        protocol, job_prompts, version, settings, _ = job
        # tritonclient.http (gevent) clients cannot be shared between threads.
        own = GenerationClients(server)
        try:
            start.wait()
            return own.generate(protocol, job_prompts, version, **settings)
        finally:
            own.close()

    # Twice over, so requests also meet others they did not meet the first time.
    for _ in range(2):
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        for job, result in zip(jobs, results):
            assert result == job[4], job[:4]


# --- 9. metadata and statistics ------------------------------------------------------------


def test_metadata(server):
    for version in VERSIONS:
        assert server.get(f"/v2/models/{MODEL}/versions/{version}/ready").status_code == 200
        metadata = server.get(f"/v2/models/{MODEL}/versions/{version}").json()
        # text_input, then the optional inputs of Triton's vLLM backend (tests/test_llm_io.py).
        assert metadata["inputs"] == [
            {"name": "text_input", "datatype": "BYTES", "shape": [-1]},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
            *({"name": name, "datatype": "BOOL", "shape": [1]} for name in (
                "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
                "return_num_output_tokens")),
        ]
        assert metadata["outputs"] == [
            {"name": "generated_text", "datatype": "BYTES", "shape": [-1]},
            {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
            {"name": "num_input_tokens", "datatype": "UINT32", "shape": [-1]},
            {"name": "num_output_tokens", "datatype": "UINT32", "shape": [-1]},
        ]


def model_stats(server, version: str) -> dict:
    response = server.get(f"/v2/models/{MODEL}/versions/{version}/stats")
    assert response.status_code == 200, response.text
    (stats,) = response.json()["model_stats"]
    assert (stats["name"], stats["version"]) == (MODEL, version)
    return stats


def successes(stats: dict) -> int:
    return stats["inference_stats"]["success"]["count"]


def test_statistics(server):
    """max_batch_size 0: each request is one inference and one execution."""
    before = model_stats(server, "1")
    prompts = [ref["prompt"] for ref in cases("1")]
    for count in (1, 2, 3):
        generate(server, prompts[:count], "1", **GREEDY)
    assert_error(generate_request(server, ["Hello"], "1", temperature=-1), "temperature")
    deadline = time.monotonic() + 5
    while True:  # statistics are reported just after the response is sent
        after = model_stats(server, "1")
        done = successes(after) - successes(before)
        failed = (
            after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"]
        )
        if (done >= 3 and failed >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done == 3
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 3
    assert failed == 1


# --- 10. the uncached baseline ---------------------------------------------------------------


def test_without_kv_cache_the_tokens_are_the_same(repository_copy, start_server):
    """use_cache=false re-runs the whole sequence at every step (the benchmark's
    baseline): greedy output must equal the cached path's, i.e. transformers'."""
    repository = repository_copy(MODEL)
    config = repository / MODEL / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters: { key: "use_cache", value: { string_value: "false" } }\n'
    )
    uncached = start_server(repository)
    for version in VERSIONS:
        refs = cases(version)
        texts = generate(uncached, [ref["prompt"] for ref in refs], version, **GREEDY)
        assert texts == [expected_text(ref) for ref in refs]
