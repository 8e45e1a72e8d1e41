"""Cancelling a generation request stops the work within a decode step and frees the
instance (gRPC propagates client cancellation to the backend)."""

import time

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "gpt2-small"
VERSION = "2"
# Enough work that the whole generation takes many decode steps.
LONG_JOB = {"max_new_tokens": 120, "do_sample": True, "seed": 1}
PROMPTS = ["Once upon a time"] * 64


def text_input(texts):
    tensor = grpcclient.InferInput("text_input", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def inference_stats(server):
    stats = server.get(f"/v2/models/{MODEL}/versions/{VERSION}/stats").json()
    return stats["model_stats"][0]["inference_stats"]


def wait_for_failures(server, count: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = inference_stats(server)
        if stats["fail"]["count"] >= count:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"no failed request recorded: {inference_stats(server)}")


def test_cancelled_generation_stops_early_and_frees_the_instance(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    before = inference_stats(server)

    started = time.monotonic()
    client.infer(MODEL, [text_input(PROMPTS)], model_version=VERSION, parameters=LONG_JOB)
    full_seconds = time.monotonic() - started

    answers = []
    call = client.async_infer(
        MODEL,
        [text_input(PROMPTS)],
        callback=lambda result, error: answers.append((result, error)),
        model_version=VERSION,
        parameters=LONG_JOB,
    )
    time.sleep(full_seconds / 10)
    call.cancel()

    after = wait_for_failures(server, before["fail"]["count"] + 1)
    cancelled_ns = after["fail"]["ns"] - before["fail"]["ns"]
    assert cancelled_ns < full_seconds * 1e9 / 2, (
        f"the cancelled request ran {cancelled_ns / 1e9:.3f}s of a {full_seconds:.3f}s job"
    )

    # The instance is free again: a short request is answered at once and correctly.
    result = client.infer(
        MODEL, [text_input(["Hi"])], model_version=VERSION, parameters={"max_new_tokens": 2}
    )
    generated = result.as_numpy("generated_text")
    assert generated.shape == (1,) and generated[0].decode().startswith("Hi")
    assert server.is_healthy()
