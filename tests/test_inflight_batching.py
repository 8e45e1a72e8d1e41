"""In-flight (continuous) batching of text generation, through a real tritonserver.

Requests that arrive while a batch is decoding join it at the next step, and each one
leaves when it ends without holding up the others. Whatever else is in the batch,
greedy answers stay token-for-token equal to Hugging Face transformers' (tests/reference/
gpt2-small.json); the batch's limits (`max_sequences_in_flight`, `max_tokens_in_flight`)
queue what does not fit and refuse, clearly, a request that could never fit.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import (
    assert_error,
    copy_models,
    load_reference,
    running_server,
    text_input,
)
from test_generation import decode_ids

REFERENCE = load_reference("gpt2-small")
STREAM_MODEL = "gpt2-small-stream"  # version 1: gpt2-small version 1's decoder


def cases(version: str) -> list[dict]:
    return REFERENCE["versions"][version]


def greedy(max_new_tokens: int) -> dict:
    return {"do_sample": False, "max_new_tokens": max_new_tokens}


def expected(ref: dict, count: int) -> str:
    """The prompt and the first `count` tokens transformers chose for it."""
    return ref["prompt"] + decode_ids(ref["new_token_ids"][:count])


def generate(server, model: str, version: str, prompts: list[str], parameters: dict) -> list[str]:
    response = server.post(
        f"/v2/models/{model}/versions/{version}/infer",
        {"inputs": [text_input(prompts)], "parameters": parameters},
    )
    assert response.status_code == 200, (response.status_code, response.text[:2000])
    (output,) = response.json()["outputs"]
    return output["data"]


class GrpcStream:
    """One streaming request on gpt2-small-stream, its pieces collected in the background."""

    def __init__(self, server, prompt: str, parameters: dict):
        self.pieces: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.text = ""
        self.generated_tokens = None
        self.error = None
        self._client = grpcclient.InferenceServerClient(server.grpc_url)
        self._client.start_stream(callback=partial(GrpcStream._on_response, self))
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        self._client.async_stream_infer(
            STREAM_MODEL,
            [text],
            model_version="1",
            parameters=parameters,
            enable_empty_final_response=True,
        )

    def _on_response(self, result, error) -> None:
        if error is not None:
            self.error = error
            self.done.set()
            return
        output = result.as_numpy("text_output")
        if output is not None:
            piece = output[0].decode()
            self.text += piece
            self.pieces.put(piece)
        parameters = result.get_response().parameters
        if "generated_tokens" in parameters:
            self.generated_tokens = parameters["generated_tokens"].int64_param
        if parameters["triton_final_response"].bool_param:
            self.done.set()

    def cancel(self) -> None:
        self._client.stop_stream(cancel_requests=True)
        self._client.close()

    def finish(self, timeout: float = 60.0) -> str:
        assert self.done.wait(timeout), "the stream never ended"
        self._client.stop_stream()
        self._client.close()
        assert self.error is None, self.error
        return self.text


@pytest.fixture(autouse=True)
def healthy_afterwards(server):
    yield
    assert server.is_healthy(), server.log()[-5000:]


def test_a_request_joins_a_running_generation_and_leaves_before_it(server):
    """A short request sent while a long generation streams is answered while the long
    one still runs (it joined the batch instead of waiting behind it), and neither
    answer changes: each equals what the same request gets alone."""
    short_ref = cases("1")[1]
    # Greedy decoding of "Hello" meets no end of text in 120 tokens.
    long_prompt, long_job = "Hello", greedy(120)
    stream = GrpcStream(server, long_prompt, long_job)
    alone = stream.finish()
    assert stream.generated_tokens == 120, alone

    running = GrpcStream(server, long_prompt, long_job)
    running.pieces.get(timeout=60)  # the long generation is decoding
    short = server.post(
        f"/v2/models/{STREAM_MODEL}/versions/1/generate",
        {"text_input": short_ref["prompt"], "stream": False, "parameters": greedy(20)},
    )
    assert not running.done.is_set(), "the short request waited for the long one to end"
    assert short.status_code == 200, short.text
    assert short.json()["text_output"] == expected(short_ref, 20)
    assert running.finish() == alone


def test_a_cancelled_request_leaves_and_the_others_run_on(server):
    """Two long generations share the batch; the client of one goes away: the other
    still gets all its tokens, the same text as alone."""
    long_prompt, long_job = "Hello", greedy(120)
    alone = GrpcStream(server, long_prompt, long_job).finish()
    kept = GrpcStream(server, long_prompt, long_job)
    dropped = GrpcStream(server, long_prompt, long_job)
    kept.pieces.get(timeout=60)
    dropped.pieces.get(timeout=60)
    dropped.cancel()
    assert kept.finish() == alone
    assert kept.generated_tokens == 120


def test_long_generations_beside_a_churn_of_short_ones_stay_inside_the_context(server):
    """Generations that run close to the context (128 tokens) while short requests keep
    joining and leaving: the rows that end leave the batch's cache in time for it never
    to outgrow the context, and every answer is what the same request gets alone."""
    long_prompts, short_prompts = ["Hi", "Hello", "Hi"], ["Hi"]
    jobs = [(long_prompts, greedy(120)) if i % 3 == 0 else (short_prompts, greedy(1 + i % 2))
            for i in range(90)]
    alone = {(tuple(p), j["max_new_tokens"]): generate(server, "gpt2-small", "1", p, j)
             for p, j in jobs[:3]}

    def send(job):
        prompts, parameters = job
        return generate(server, "gpt2-small", "1", prompts, parameters)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, jobs))
    for (prompts, parameters), texts in zip(jobs, answers):
        assert texts == alone[(tuple(prompts), parameters["max_new_tokens"])], parameters


@pytest.mark.parametrize("version", ["1", "2"])
def test_greedy_answers_equal_the_reference_under_staggered_mixed_load(server, version):
    """Requests of different prompts, lengths and settings arrive one after another
    while others decode: sampled rows, multi-prompt requests and rows that leave early
    share the batch, and every greedy row still equals transformers' tokens."""
    refs = cases(version)
    jobs = []
    for count in (3, 20, 11, 1):
        for ref in refs:
            jobs.append(([ref["prompt"]], greedy(count), [expected(ref, count)]))
    jobs.append(([r["prompt"] for r in refs], greedy(20), [expected(r, 20) for r in refs]))
    for seed in range(4):
        sampled = {"do_sample": True, "seed": seed, "max_new_tokens": 40, "temperature": 1.2}
        jobs.append((["Once upon a time", "Hello"], sampled, None))
    random.Random(int(version)).shuffle(jobs)

    def send(index: int, job):
        prompts, parameters, wanted = job
        time.sleep(index * 0.004)  # staggered: most join a batch already decoding
        return generate(server, "gpt2-small", version, prompts, parameters), wanted

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, range(len(jobs)), jobs))
    for (texts, wanted), (prompts, parameters, _) in zip(answers, jobs):
        if wanted is None:
            assert len(texts) == len(prompts) and all(
                text.startswith(prompt) for text, prompt in zip(texts, prompts)
            )
        else:
            assert texts == wanted, (prompts, parameters)


LIMITED = "gpt2-limited"


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """gpt2-small version 1 running at most 2 sequences and 100 cache positions."""
    root = tmp_path_factory.mktemp("inflight")
    repository = copy_models(root / "model-repository", "gpt2-small")
    (repository / "gpt2-small").rename(repository / LIMITED)
    config = (repository / LIMITED / "config.pbtxt").read_text()
    config = config.replace('name: "gpt2-small"', f'name: "{LIMITED}"')
    config = config.replace("version_policy: { all { } }", "version_policy: { specific { versions: [1] } }")
    for key, value in (
        ("max_prompts_per_request", "2"),
        ("max_sequences_in_flight", "2"),
        ("max_tokens_in_flight", "100"),
    ):
        config += f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
    (repository / LIMITED / "config.pbtxt").write_text(config)
    with running_server(repository, root / "tritonserver.log") as triton:
        yield triton


def test_requests_past_the_batch_limits_wait_their_turn(limited_server):
    """Eight concurrent requests on a batch of two sequences: the rest queue and every
    answer is still the reference."""
    refs = cases("1")
    jobs = [refs[i % len(refs)] for i in range(8)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(
            lambda ref: generate(limited_server, LIMITED, "1", [ref["prompt"]], greedy(20)), jobs
        ))
    assert texts == [[expected(ref, 20)] for ref in jobs]


def test_a_request_that_could_never_fit_is_refused_clearly(limited_server):
    # Two prompts that may reach 4 + 60 tokens: 128 cache positions, past the 100 allowed.
    response = limited_server.post(
        f"/v2/models/{LIMITED}/versions/1/infer",
        {"inputs": [text_input(["The weather today is"] * 2)], "parameters": greedy(60)},
    )
    assert_error(response, "max_tokens_in_flight", "128 positions", "fewer 'max_new_tokens'")
    # One of them alone fits.
    (text,) = generate(limited_server, LIMITED, "1", ["The weather today is"], greedy(60))
    assert text.startswith(expected(cases("1")[0], 20))
