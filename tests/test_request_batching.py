"""Encoders batch requests across executions, through a real tritonserver: the requests
that queue while the instance runs a batch go into its next ONNX Runtime run together
(counted by `triton_rust_encoder_runs_total`), and each gets the answer it gets alone;
`batch_requests: false` runs one request per execution. The instances of a model share
one queue: a request waits for the first free instance, not for the one Triton gave it
to."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import (
    MODEL_REPOSITORY,
    infer,
    metric_sum,
    outputs_by_name,
    running_server,
    text_input,
    with_instances,
)

CLASSIFIER = "sentiment-classifier"
BATCHED = f"{CLASSIFIER}-batched"
SERIAL = f"{CLASSIFIER}-serial"
TWO_INSTANCES = f"{CLASSIFIER}-two-instances"
# 256 texts of 128 tokens, all one length so they run as one batch: about 0.4 s of work
# on the bundled classifier, long enough for the light requests to queue behind it.
HEAVY = [" ".join(f"word{i}" for i in range(200))] * 256
# One text, so that length grouping keeps the light requests in one run.
LIGHT = "Not good at all."
LIGHT_REQUESTS = 15


def runs(triton, model: str) -> float:
    """ONNX Runtime runs of the model's served version so far."""
    return metric_sum(triton, "triton_rust_encoder_runs_total", model=model, version="2")


def without_triton_queue(config: str, name: str, instances: int = 1) -> str:
    """The shipped config as model `name` on `instances`, without Triton's priority
    queue. With priorities or a queue policy, Triton 2.51 hands a `max_batch_size: 0`
    model its requests one at a time, at most two per instance ahead, and after a burst
    may hold the rest until its scheduler's 0.5 s poll: the runs would count Triton's
    timing, not the backend's batching (README, "Priorities and queue limits")."""
    config, removed = re.subn(r"\ndynamic_batching \{.*?\n\}\n", "\n", config, flags=re.S)
    assert removed == 1, config
    assert f'name: "{CLASSIFIER}"' in config
    return with_instances(config.replace(f'name: "{CLASSIFIER}"', f'name: "{name}"'), instances)


@pytest.fixture(scope="module")
def batched_and_serial(tmp_path_factory):
    """The shipped classifier as `BATCHED`, a copy with `batch_requests: false`, and one
    on two instances."""
    repository = tmp_path_factory.mktemp("repository")
    config = (MODEL_REPOSITORY / CLASSIFIER / "config.pbtxt").read_text()
    serial = 'parameters: { key: "batch_requests", value: { string_value: "false" } }\n'
    for name, instances, extra in [(BATCHED, 1, ""), (SERIAL, 1, serial), (TWO_INSTANCES, 2, "")]:
        shutil.copytree(MODEL_REPOSITORY / CLASSIFIER, repository / name)
        (repository / name / "config.pbtxt").write_text(
            without_triton_queue(config, name, instances) + extra)
    with running_server(repository, tmp_path_factory.mktemp("server") / "tritonserver.log") as triton:
        yield triton


def scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(outputs_by_name(response)["sentiment_score"]["data"], dtype=np.float32)


def behind_a_heavy_request(triton, model: str) -> tuple[float, list[np.ndarray], int]:
    """Sends the heavy request, then the light ones at once while it runs; returns the
    runs they took, the light answers, and how many light answers came after the heavy
    one."""
    before = runs(triton, model)
    answered = []
    with ThreadPoolExecutor(1 + LIGHT_REQUESTS) as pool:
        heavy = pool.submit(infer, triton, model, [text_input(HEAVY)], ["sentiment_score"])
        heavy.add_done_callback(lambda _: answered.append("heavy"))
        time.sleep(0.15)
        light = [pool.submit(infer, triton, model, [text_input([LIGHT])], ["sentiment_score"])
                 for _ in range(LIGHT_REQUESTS)]
        for future in light:
            future.add_done_callback(lambda _: answered.append("light"))
        assert heavy.result().status_code == 200, heavy.result().text
        answers = [scores(future.result()) for future in light]
    after_heavy = len(answered) - 1 - answered.index("heavy")
    return runs(triton, model) - before, answers, after_heavy


def test_requests_queued_during_a_run_go_into_the_next_one(batched_and_serial):
    triton = batched_and_serial
    alone = scores(infer(triton, BATCHED, [text_input([LIGHT])], ["sentiment_score"]))
    for model in (SERIAL, BATCHED):
        taken, answers, _ = behind_a_heavy_request(triton, model)
        for answer in answers:
            np.testing.assert_allclose(answer, alone, rtol=1e-4, atol=1e-5)
        if model == SERIAL:
            # One run per request: the heavy one, then each light one.
            assert taken == 1 + LIGHT_REQUESTS, taken
        else:
            # The heavy run, then the light requests that queued during it, together (a
            # straggler may run on its own).
            assert taken <= 4, taken


def test_a_free_instance_takes_what_queued_for_a_busy_one(batched_and_serial):
    """Triton spreads the light requests over both instances, and its instance that
    runs the heavy request keeps accepting them (its `execute` only queues them). The
    other instance takes them all from the shared queue, so none waits for the heavy
    run: every light answer comes before the heavy one. With a queue per instance,
    Triton gave some to the busy instance in about half the tries, so three tries."""
    triton = batched_and_serial
    alone = scores(infer(triton, TWO_INSTANCES, [text_input([LIGHT])], ["sentiment_score"]))
    for _ in range(3):
        _, answers, after_heavy = behind_a_heavy_request(triton, TWO_INSTANCES)
        for answer in answers:
            np.testing.assert_allclose(answer, alone, rtol=1e-4, atol=1e-5)
        assert after_heavy == 0, f"{after_heavy} light answers waited for the heavy run"
