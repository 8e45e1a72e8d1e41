"""Request priorities and queue limits of the shipped configs, under overload, through a
real tritonserver: a high-priority request overtakes the low-priority ones queued before
it (where one at the default priority waits behind them), and a request past the queue
limit or past its queue timeout is rejected at once with a clear error instead of
waiting on."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import error_message, metric_sum, text_input, with_instances

CLASSIFIER = "sentiment-classifier"
QUEUED_MODELS = ["sentiment-classifier", "bert-base", "gpt2-small", "gpt2-small-stream"]
# 64 texts of 128 tokens: about 0.1 s of work on the bundled classifier, so that a few
# of them queue behind each other on its one instance.
HEAVY = {"inputs": [text_input([" ".join(f"word{i}" for i in range(200))] * 64)]}
LIGHT = {"inputs": [text_input(["Fine."])]}
HEAVY_REQUESTS = 8


def test_shipped_models_queue_with_priorities_and_limits(server):
    for model in QUEUED_MODELS:
        batching = server.get(f"/v2/models/{model}/config").json()["dynamic_batching"]
        assert (batching["priority_levels"], batching["default_priority_level"]) == (2, 2), model
        policy = batching["default_queue_policy"]
        assert policy["timeout_action"] == "REJECT", model
        assert policy["max_queue_size"] > 0 and int(policy["default_timeout_microseconds"]) > 0
        assert policy["allow_timeout_override"], model


def pending(triton, model: str) -> float:
    """Requests waiting in the model's queue (Triton's own gauge)."""
    return metric_sum(triton, "nv_inference_pending_request_count", model=model)


class Overload:
    """Heavy requests in flight on the classifier, each answer's time recorded."""

    def __init__(self, triton, count: int = HEAVY_REQUESTS):
        self.triton = triton
        self.finished: list[float] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(count)
        self._futures = [self._pool.submit(self._send, HEAVY) for _ in range(count)]

    def _send(self, body) -> tuple[int, float, str]:
        started = time.monotonic()
        response = self.triton.post(f"/v2/models/{CLASSIFIER}/infer", body)
        answered = time.monotonic()
        with self._lock:
            self.finished.append(answered)
            self.statuses.append(response.status_code)
        message = "" if response.status_code == 200 else error_message(response)
        return response.status_code, answered - started, message

    def wait_queued(self, at_least: int) -> None:
        deadline = time.monotonic() + 30
        while pending(self.triton, CLASSIFIER) < at_least:
            assert time.monotonic() < deadline, "the heavy requests never queued"
            time.sleep(0.01)

    def results(self) -> list[tuple[int, float, str]]:
        results = [future.result(timeout=120) for future in self._futures]
        self._pool.shutdown()
        return results


# A heavy request that ran after `body` is answered at least one heavy run (~40 ms of
# ONNX Runtime alone) after it; one answered within this margin ran before it, and only
# its client thread noted the time later (8 client threads on 2 busy cores).
CLIENT_NOISE_S = 0.02


def answered_before(triton, overload: Overload, body) -> int:
    """How many of the queued heavy requests were answered after `body`, sent now."""
    response = triton.post(f"/v2/models/{CLASSIFIER}/infer", body)
    assert response.status_code == 200, response.text
    answered = time.monotonic()
    overload.results()
    assert overload.statuses == [200] * HEAVY_REQUESTS
    return sum(1 for finished in overload.finished if finished > answered + CLIENT_NOISE_S)


@pytest.fixture
def classifier_server(repository_copy, start_server):
    """Factory: a server with the shipped classifier on one instance (so that the heavy
    requests queue behind each other), its config text changed by `replacements`."""

    def start(**replacements: str):
        repository = repository_copy(CLASSIFIER)
        config = repository / CLASSIFIER / "config.pbtxt"
        text = with_instances(config.read_text(), 1)
        for old, new in replacements.items():
            assert old in text, f"config.pbtxt changed: {old!r} not found"
            text = text.replace(old, new)
        config.write_text(text)
        return start_server(repository)

    return start


def test_high_priority_requests_overtake_low_priority_ones(classifier_server):
    triton = classifier_server()
    # At the default priority, a light request waits behind every queued heavy one...
    overload = Overload(triton)
    overload.wait_queued(HEAVY_REQUESTS - 2)
    behind = answered_before(triton, overload, LIGHT)
    assert behind <= 1, f"a default-priority request overtook {behind} queued requests"
    # ...and at priority 1 it goes first: only the heavy request executing, and perhaps
    # the next one already taken, end after it.
    overload = Overload(triton)
    overload.wait_queued(HEAVY_REQUESTS - 2)
    ahead = answered_before(triton, overload, {**LIGHT, "parameters": {"priority": 1}})
    assert ahead >= HEAVY_REQUESTS - 3, f"a priority-1 request overtook only {ahead} requests"


def test_requests_past_the_queue_limit_are_rejected_at_once(classifier_server):
    triton = classifier_server(**{"max_queue_size: 512": "max_queue_size: 2"})
    overload = Overload(triton)
    results = overload.results()
    accepted = [latency for status, latency, _ in results if status == 200]
    rejected = [(status, latency, message) for status, latency, message in results if status != 200]
    # One executes, two wait: the rest cannot queue.
    assert len(accepted) >= 3 and len(rejected) >= 3, results
    for status, latency, message in rejected:
        assert status == 503 and "Exceeds maximum queue size" in message, (status, message)
        assert latency < min(accepted), (latency, accepted)


def test_requests_waiting_past_their_timeout_are_rejected(classifier_server):
    triton = classifier_server()
    overload = Overload(triton)
    overload.wait_queued(HEAVY_REQUESTS - 2)
    started = time.monotonic()
    response = triton.post(f"/v2/models/{CLASSIFIER}/infer", {**LIGHT, "parameters": {"timeout": 50_000}})
    rejected_after = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert "Request timeout expired" in error_message(response)
    overload.results()
    # Rejected when the request executing ends, not after the queue ahead of it.
    assert rejected_after < max(overload.finished) - started
