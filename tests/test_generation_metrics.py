"""Generation metrics on Triton's metrics endpoint, through a real tritonserver: the
counts of prompt and generated tokens equal the reference's token ids for greedy
requests, the histograms see one first token per request and one gap per further token,
each sequence ends with its finish reason (`length`, `stop`, `abort` for a cancelled
one), the running gauge returns to zero, and `promtool check metrics` accepts the
exposition."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from conftest import MODEL_REPOSITORY, load_reference, metric_sum, running_server, text_input

MODEL = "gpt2-small"
VERSION = "1"
REFERENCE = load_reference(MODEL)
CASES = REFERENCE["versions"][VERSION]
GREEDY = {"do_sample": False, "max_new_tokens": REFERENCE["max_new_tokens"]}
LABELS = {"model": MODEL, "version": VERSION}


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """A server of its own, so the counts start from what its warm-up left."""
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(MODEL_REPOSITORY / MODEL, repository / MODEL)
    with running_server(repository, tmp_path_factory.mktemp("server") / "tritonserver.log") as server:
        yield server


def counts(triton) -> dict[str, float]:
    """The model version's generation series (histograms by their counts)."""
    names = {
        "prompt": "triton_rust_prompt_tokens_total",
        "generated": "triton_rust_generation_tokens_total",
        "first_token": "triton_rust_time_to_first_token_seconds_count",
        "gaps": "triton_rust_time_per_output_token_seconds_count",
        "running": "triton_rust_num_requests_running",
    }
    found = {key: metric_sum(triton, name, **LABELS) for key, name in names.items()}
    for reason in ("stop", "length", "abort"):
        found[reason] = metric_sum(
            triton, "triton_rust_request_success_total", finished_reason=reason, **LABELS
        )
    return found


def generate(triton, prompt: str, **parameters) -> requests.Response:
    body = {"inputs": [text_input([prompt])], "parameters": parameters}
    response = triton.post(f"/v2/models/{MODEL}/versions/{VERSION}/infer", body)
    assert response.status_code == 200, response.text
    return response


def delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in before}


def test_token_counts_and_latencies_follow_the_reference(triton):
    before = counts(triton)
    eos = REFERENCE["eos_token_id"]
    for case in CASES:
        generate(triton, case["prompt"], **GREEDY)
    new_tokens = [[t for t in case["new_token_ids"] if t != eos] for case in CASES]
    hit_length = sum(len(ids) == GREEDY["max_new_tokens"] for ids in new_tokens)
    assert delta(before, counts(triton)) == {
        "prompt": sum(len(case["input_ids"]) for case in CASES),
        "generated": sum(map(len, new_tokens)),
        "first_token": len(CASES),
        "gaps": sum(len(ids) - 1 for ids in new_tokens),
        "running": 0,
        "length": hit_length,
        "stop": len(CASES) - hit_length,
        "abort": 0,
    }


def test_a_stop_string_ends_with_stop(triton):
    case = CASES[0]
    # A word of the greedy continuation (as the generation tests choose stop strings).
    stop = re.findall(r"[A-Za-z]{3,}", case["new_text"])[1]
    before = counts(triton)
    text = generate(triton, case["prompt"], stop=stop, **GREEDY).json()["outputs"][0]["data"][0]
    assert stop not in text[len(case["prompt"]):]
    changed = delta(before, counts(triton))
    assert (changed["stop"], changed["length"], changed["running"]) == (1, 0, 0), changed
    assert 0 < changed["generated"] <= GREEDY["max_new_tokens"], changed


def grpc_text(prompts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text_input", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array(prompts, dtype=object))
    return tensor


def test_a_cancelled_sequence_ends_with_abort(triton):
    before = counts(triton)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    long_job = {"max_new_tokens": 120, "do_sample": True, "seed": 1}
    call = client.async_infer(MODEL, [grpc_text(["Once upon a time"] * 32)],
                              callback=lambda result, error: None,
                              model_version=VERSION, parameters=long_job)
    # Cancel once the sequences are running.
    deadline = time.monotonic() + 30
    while counts(triton)["running"] < 32 and time.monotonic() < deadline:
        time.sleep(0.005)
    call.cancel()
    while time.monotonic() < deadline:
        changed = delta(before, counts(triton))
        if changed["running"] == 0 and changed["abort"] + changed["stop"] + changed["length"] == 32:
            break
        time.sleep(0.05)
    client.close()
    assert changed["abort"] > 0, changed
    assert changed["running"] == 0, changed


def test_the_generation_metrics_pass_promtool(triton):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/lint-deploy.sh installs it)")
    generate(triton, CASES[0]["prompt"], **GREEDY)
    text = requests.get(triton.metrics_url, timeout=10).text
    ours = "".join(
        line + "\n" for line in text.splitlines()
        if line.startswith(("triton_rust_", "# HELP triton_rust_", "# TYPE triton_rust_"))
    )
    for name in ("triton_rust_time_to_first_token_seconds_bucket",
                 "triton_rust_time_per_output_token_seconds_bucket",
                 'finished_reason="length"', "triton_rust_num_requests_running"):
        assert name in ours, ours
    result = subprocess.run([promtool, "check", "metrics"], input=ours, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
