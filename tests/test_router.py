"""The traffic-split router (task `traffic-split`): a model with no files of its own that
forwards each request, inside the server (TRITONSERVER_ServerInferAsync), to one version
of another model, chosen at random by weight, and relays that version's answer with
response parameters naming the arm.

Shown through a real tritonserver: answers equal the named version's own (HTTP JSON,
the binary extension and gRPC), the arms' shares match the weights (chi-square),
request parameters and errors pass through, and a bad router configuration fails its
load with a message that names the problem.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    MODEL_REPOSITORY,
    REPO_ROOT,
    assert_error,
    canary_state,
    classifier_config,
    error_message,
    infer,
    load_model,
    load_reference,
    outputs_by_name,
    repository_index,
    text_input,
)

CLASSIFIER_AB = "sentiment-classifier-ab"
GENERATOR_AB = "gpt2-small-ab"
TEXTS = ["This is a great day!", "The food was cold and late."]

# The chi-square critical value for 1 degree of freedom at p = 0.001: a router whose
# shares match its weights fails this test once in a thousand runs.
CHI_SQUARE_1DF_P001 = 10.83


def served_by(response) -> tuple[str, str]:
    """The arm and version a router's JSON response names."""
    parameters = response.json()["parameters"]
    return parameters["ab_test_group"], parameters["ab_model_version"]


def direct(server, model: str, version: str, body: dict) -> dict:
    response = server.post(f"/v2/models/{model}/versions/{version}/infer", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_answers_equal_the_version_the_response_names(server):
    body = {"inputs": [text_input(TEXTS)]}
    seen = set()
    for _ in range(30):
        response = server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body)
        assert response.status_code == 200, response.text
        arm, version = served_by(response)
        assert arm == f"v{version}"
        seen.add(version)
        routed = response.json()
        assert routed["model_name"] == CLASSIFIER_AB
        expected = direct(server, "sentiment-classifier", version, body)
        assert routed["outputs"] == expected["outputs"]
    assert seen == {"1", "2"}, "30 requests at 50/50 reach both arms"


def test_the_seed_payload_works_against_the_router(server):
    response = infer(server, CLASSIFIER_AB, [text_input(["This is a great day!"])])
    assert response.status_code == 200, response.text
    outputs = outputs_by_name(response)
    assert outputs["sentiment_score"]["shape"] == [1, 3]
    assert outputs["sentiment_label"]["shape"] == [1]


@pytest.mark.parametrize("protocol", ["binary", "grpc"])
def test_binary_and_grpc_clients_see_the_arm(server, protocol):
    module = httpclient if protocol == "binary" else grpcclient
    url = server.http_url.removeprefix("http://") if protocol == "binary" else server.grpc_url
    client = module.InferenceServerClient(url)
    binary = {"binary_data": True} if protocol == "binary" else {}
    try:
        texts = np.array([t.encode() for t in TEXTS], dtype=object)
        tensor = module.InferInput("text_input", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(texts, **binary)
        requested = [module.InferRequestedOutput("sentiment_score", **binary)]
        seen = set()
        for _ in range(20):
            result = client.infer(CLASSIFIER_AB, [tensor], outputs=requested)
            response = result.get_response()
            if protocol == "binary":
                parameters = response["parameters"]
                arm, version = parameters["ab_test_group"], parameters["ab_model_version"]
            else:
                arm = response.parameters["ab_test_group"].string_param
                version = response.parameters["ab_model_version"].string_param
            assert arm == f"v{version}"
            seen.add(version)
            expected = direct(
                server,
                "sentiment-classifier",
                version,
                {"inputs": [text_input(TEXTS)], "outputs": [{"name": "sentiment_score"}]},
            )["outputs"][0]
            np.testing.assert_allclose(
                result.as_numpy("sentiment_score").flatten(), expected["data"], rtol=1e-6
            )
        assert seen == {"1", "2"}
    finally:
        client.close()


def arm_counts(server, model: str, body: dict, requests: int) -> dict[str, int]:
    def one(_):
        response = server.post(f"/v2/models/{model}/infer", body)
        assert response.status_code == 200, response.text
        return served_by(response)[1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        versions = list(pool.map(one, range(requests)))
    return {version: versions.count(version) for version in set(versions)}


@pytest.mark.parametrize(
    "model, weights, body",
    [
        (CLASSIFIER_AB, {"1": 0.5, "2": 0.5}, {"inputs": [text_input(["Fine."])]}),
        (
            GENERATOR_AB,
            {"1": 0.7, "2": 0.3},
            {
                "inputs": [text_input(["Hello"])],
                "parameters": {"max_new_tokens": 1, "do_sample": False},
            },
        ),
    ],
)
def test_arm_shares_match_the_weights(server, model, weights, body):
    requests = 2000
    counts = arm_counts(server, model, body, requests)
    assert set(counts) == set(weights), counts
    chi_square = sum(
        (counts[v] - requests * share) ** 2 / (requests * share) for v, share in weights.items()
    )
    assert chi_square < CHI_SQUARE_1DF_P001, (counts, chi_square)


def test_request_parameters_reach_the_version(server):
    body = {
        "inputs": [text_input(["Once upon a time"])],
        "parameters": {"max_new_tokens": 6, "do_sample": False},
    }
    for _ in range(6):
        response = server.post(f"/v2/models/{GENERATOR_AB}/infer", body)
        assert response.status_code == 200, response.text
        _, version = served_by(response)
        expected = direct(server, "gpt2-small", version, body)
        assert response.json()["outputs"] == expected["outputs"]
    sampled = dict(body, parameters={"max_new_tokens": 6, "seed": 42, "temperature": 1.3})
    response = server.post(f"/v2/models/{GENERATOR_AB}/infer", sampled)
    _, version = served_by(response)
    assert response.json()["outputs"] == direct(server, "gpt2-small", version, sampled)["outputs"]


def test_errors_come_back_with_their_status(server):
    empty = infer(server, CLASSIFIER_AB, [text_input(["fine", " "])])
    assert_error(empty, "element 1 is empty")
    response = server.post(
        f"/v2/models/{GENERATOR_AB}/infer",
        {"inputs": [text_input(["Hi"])], "parameters": {"temperature": -1}},
    )
    assert_error(response, "'temperature' must be a number > 0")
    assert server.is_healthy()
    assert infer(server, CLASSIFIER_AB, [text_input(["Still fine."])]).status_code == 200


def test_router_statistics_count_its_requests(server):
    before = server.get(f"/v2/models/{CLASSIFIER_AB}/stats").json()["model_stats"][0]
    for _ in range(5):
        assert infer(server, CLASSIFIER_AB, [text_input(["Counted."])]).status_code == 200
    assert_error(infer(server, CLASSIFIER_AB, [text_input([""])]), "is empty")
    after = server.get(f"/v2/models/{CLASSIFIER_AB}/stats").json()["model_stats"][0]
    stats_before, stats_after = before["inference_stats"], after["inference_stats"]
    assert int(stats_after["success"]["count"]) - int(stats_before["success"]["count"]) == 5
    assert int(stats_after["fail"]["count"]) - int(stats_before["fail"]["count"]) == 1


# --- what Triton's scheduler knows of a request reaches the version -----------------

ECHO_CONFIG = """name: "request-echo"
backend: "identity"
max_batch_size: 0
version_policy: { all { } }
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "TIMEOUT_US", data_type: TYPE_UINT64, dims: [ 1 ] } ]
"""


@pytest.fixture(scope="module")
def identity_backends(tmp_path_factory):
    """A backend directory with libtriton_rust.so and the trivial C++ backend of
    tools/soak/identity_backend/, compiled once for the module."""
    backends = tmp_path_factory.mktemp("backends")
    (backends / "identity").mkdir()
    (backends / "rust").symlink_to(Path(os.environ["TRITON_RUST_BACKEND_DIR"]) / "rust")
    include = REPO_ROOT / "triton-sys" / "third_party" / "triton-core-r24.10" / "include"
    subprocess.run(
        ["c++", "-shared", "-fPIC", "-O2", f"-I{include}",
         str(REPO_ROOT / "tools" / "soak" / "identity_backend" / "identity.cc"),
         "-o", str(backends / "identity" / "libtriton_identity.so")],
        check=True,
    )
    return backends


ECHO_SERVER_ARGS = [
    "--model-control-mode=explicit", "--load-model=request-echo", "--load-model=request-echo-ab"
]


@pytest.fixture
def echo_router(start_server, tmp_path, identity_backends):
    """Factory: a server with `request-echo` (versions 1 and 2) on the identity
    backend, whose output TIMEOUT_US is the timeout each request reached it with, and a
    50/50 router in front of it, `request-echo-ab`; `challenger_delay_us` makes version 2
    answer that much later, other keywords are router parameters."""
    return partial(make_echo_router, start_server, tmp_path, identity_backends)


def make_echo_router(start_server, tmp_path, backends, challenger_delay_us: int = 0,
                     **parameters: str):
    repository = tmp_path / "repository"
    for version in ("1", "2"):
        (repository / "request-echo" / version).mkdir(parents=True)
    (repository / "request-echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    if challenger_delay_us:
        (repository / "request-echo" / "2" / "delay_us").write_text(f"{challenger_delay_us}\n")
    (repository / "request-echo-ab" / "1").mkdir(parents=True)
    router = ECHO_CONFIG.replace('name: "request-echo"', 'name: "request-echo-ab"')
    router = router.replace('backend: "identity"', 'backend: "rust"')
    router = router.replace("version_policy: { all { } }\n", "")
    router += (
        'parameters: { key: "task", value: { string_value: "traffic-split" } }\n'
        'parameters: { key: "target_model", value: { string_value: "request-echo" } }\n'
        'parameters: { key: "arms", value: { string_value: "1:50,2:50" } }\n'
    )
    for key, value in parameters.items():
        router += f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
    (repository / "request-echo-ab" / "config.pbtxt").write_text(router)
    return start_server(
        repository,
        args=ECHO_SERVER_ARGS,
        backend_dir=backends,
    )


def test_the_clients_timeout_reaches_the_version(echo_router):
    server = echo_router()
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [0.0]}]}
    timed = dict(body, parameters={"timeout": 250_000})

    def timeout_seen(model: str, request: dict) -> tuple[int, str | None]:
        response = server.post(f"/v2/models/{model}/infer", request)
        assert response.status_code == 200, response.text
        version = response.json().get("parameters", {}).get("ab_model_version")
        return response.json()["outputs"][0]["data"][0], version

    # Triton takes the KServe parameter as the request's timeout.
    assert timeout_seen("request-echo", timed)[0] == 250_000
    assert timeout_seen("request-echo", body)[0] == 0
    seen = {timeout_seen("request-echo-ab", timed) for _ in range(30)}
    assert seen == {(250_000, "1"), (250_000, "2")}, seen
    assert {timeout_seen("request-echo-ab", body)[0] for _ in range(10)} == {0}

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput("INPUT0", [1], "FP32")
        tensor.set_data_from_numpy(np.zeros(1, dtype=np.float32))
        result = client.infer("request-echo-ab", [tensor], timeout=180_000)
        assert result.as_numpy("TIMEOUT_US").tolist() == [180_000]
    finally:
        client.close()


# --- per-arm metrics on Triton's :8002 ------------------------------------------------

AB_METRICS = ("triton_rust_ab_requests_total", "triton_rust_ab_failures_total",
              "triton_rust_ab_request_duration_seconds_count", "triton_rust_ab_arm_weight_percent",
              "triton_rust_ab_window_samples", "triton_rust_ab_p_value",
              "triton_rust_ab_p_value_fixed_horizon")


def ab_metrics(server, router: str, target: str = "sentiment-classifier") -> dict[tuple[str, str], float]:
    """{(sample name, version): value} of `router`'s A/B series on Triton's metrics
    endpoint, parsed by the Prometheus client library's parser; the p-values' names
    end with their test, e.g. `triton_rust_ab_p_value/latency`."""
    text = requests.get(server.metrics_url, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in AB_METRICS and sample.labels.get("router") == router:
                labels = sample.labels
                assert labels["arm"] == f"v{labels['version']}", labels
                assert labels["target"] == target, labels
                name = f"{sample.name}/{labels['test']}" if "test" in labels else sample.name
                samples[(name, labels["version"])] = sample.value
    return samples


def test_per_arm_metrics_count_what_each_arm_served(server):
    before = ab_metrics(server, CLASSIFIER_AB)
    served = arm_counts(server, CLASSIFIER_AB, {"inputs": [text_input(["Counted per arm."])]}, 60)
    bad = 7
    for _ in range(bad):
        assert_error(infer(server, CLASSIFIER_AB, [text_input([""])]), "is empty")
    after = ab_metrics(server, CLASSIFIER_AB)

    def delta(name: str, version: str) -> float:
        return after[(name, version)] - before.get((name, version), 0.0)

    assert set(served) == {"1", "2"}, served
    failures = 0.0
    for version in ("1", "2"):
        forwarded = delta("triton_rust_ab_requests_total", version)
        failed = delta("triton_rust_ab_failures_total", version)
        assert forwarded - failed == served[version], (version, before, after)
        # Every forwarded request was answered, and timed.
        assert delta("triton_rust_ab_request_duration_seconds_count", version) == forwarded
        assert after[("triton_rust_ab_arm_weight_percent", version)] == 50
        failures += failed
    assert failures == bad, (before, after)


def test_statistics_compare_each_challenger_with_the_champion(server):
    """sentiment-classifier-ab's versions are alike: the challenger (v2) has p-values
    and a window; the champion (v1, the first arm) has a window only."""
    for _ in range(3):
        arm_counts(server, CLASSIFIER_AB, {"inputs": [text_input(["Compared."])]}, 60)
    metrics = ab_metrics(server, CLASSIFIER_AB)
    assert ("triton_rust_ab_p_value/latency", "1") not in metrics, metrics
    assert metrics[("triton_rust_ab_window_samples", "1")] > 0, metrics
    assert metrics[("triton_rust_ab_window_samples", "2")] > 0, metrics
    for test in ("latency", "errors"):
        for name in ("triton_rust_ab_p_value", "triton_rust_ab_p_value_fixed_horizon"):
            assert 0.0 <= metrics[(f"{name}/{test}", "2")] <= 1.0, metrics


def test_a_slower_challenger_is_found(echo_router):
    """Version 2 answers 4 ms late: its always-valid latency p-value falls far below
    any alarm level within 400 requests, sent one at a time (the tests take requests as
    independent, which concurrent requests queueing on one instance are not: see the
    README). That alike versions raise no more false alarms than the level allows is
    shown on simulated requests (`ab_stats` unit tests): on a busy machine two copies of
    one version can really differ by more than the allowed 20 %."""
    server = echo_router(challenger_delay_us=4000)
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [0.0]}]}
    for _ in range(400):
        response = server.post("/v2/models/request-echo-ab/infer", body)
        assert response.status_code == 200, response.text
    metrics = ab_metrics(server, "request-echo-ab", target="request-echo")
    assert metrics[("triton_rust_ab_p_value/latency", "2")] < 1e-4, metrics
    assert metrics[("triton_rust_ab_p_value_fixed_horizon/latency", "2")] < 1e-4, metrics
    # No request failed: no evidence against the challenger's error rate.
    assert metrics[("triton_rust_ab_p_value/errors", "2")] == 1.0, metrics
    assert metrics[("triton_rust_ab_window_samples", "1")] + metrics[
        ("triton_rust_ab_window_samples", "2")
    ] == 400, metrics


# --- canary releases -------------------------------------------------------------------

ECHO_ROUTER = "request-echo-ab"
ECHO_BODY = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [0.0]}]}


def send_one_at_a_time(server, requests_count: int) -> list[str]:
    """The versions that served `requests_count` requests sent one after another."""
    versions = []
    for _ in range(requests_count):
        response = server.post("/v2/models/request-echo-ab/infer", ECHO_BODY)
        assert response.status_code == 200, response.text
        versions.append(response.json()["parameters"]["ab_model_version"])
    return versions


def test_a_slower_canary_is_rolled_back_at_once(echo_router):
    server = echo_router(challenger_delay_us=4000, canary_steps="10,50,100", canary_min_samples="30")
    assert canary_state(server, ECHO_ROUTER) == {"progressing": 1, "promoted": 0, "rolled_back": 0}
    versions = send_one_at_a_time(server, 600)
    assert "2" in versions[:300], "the canary got no traffic at its first step"
    assert canary_state(server, ECHO_ROUTER) == {"progressing": 0, "promoted": 0, "rolled_back": 1}
    assert set(versions[-100:]) == {"1"}, versions[-100:]
    assert weights_on_metrics(server, "request-echo-ab", "request-echo") == {"1": 100, "2": 0}
    assert "canary 'request-echo-ab': Step(0) -> RolledBack: the challenger is worse (latency" in server.log()


def test_a_healthy_canary_is_promoted_step_by_step_and_a_reload_or_restart_starts_it_again(
    echo_router, start_server, identity_backends
):
    # A generous latency margin: two copies of one version can differ on a busy machine.
    server = echo_router(canary_steps="10,50,100", canary_min_samples="30",
                         latency_regression_percent="100")
    versions = send_one_at_a_time(server, 900)
    assert canary_state(server, ECHO_ROUTER) == {"progressing": 0, "promoted": 1, "rolled_back": 0}
    assert set(versions[-100:]) == {"2"}, versions[-100:]
    assert weights_on_metrics(server, "request-echo-ab", "request-echo") == {"1": 0, "2": 100}
    log = server.log()
    first, second = log.index("Step(0) -> Step(1)"), log.index("Step(1) -> Promoted")
    assert first < second
    # The canary lives in the router's memory: a reload (or a restart) starts it again.
    config = server.get("/v2/models/request-echo-ab/config").json()
    config["parameters"]["canary_min_samples"] = {"string_value": "31"}
    response = load_model(server, "request-echo-ab", config)
    assert response.status_code == 200, error_message(response)
    assert canary_state(server, ECHO_ROUTER) == {"progressing": 1, "promoted": 0, "rolled_back": 0}
    assert weights_on_metrics(server, "request-echo-ab", "request-echo") == {"1": 90, "2": 10}
    # Past the first step again, then a restart: it starts at the first step too. The
    # split is random: 31 challenger answers at 10 % take 310 requests on average, and a
    # fixed count of 450 missed them about once in 20 runs (the last look can also come
    # just after the last answer is read), so requests go on in rounds until the step.
    for _ in range(30):
        send_one_at_a_time(server, 50)
        if weights_on_metrics(server, "request-echo-ab", "request-echo")["2"] >= 50:
            break
    assert weights_on_metrics(server, "request-echo-ab", "request-echo")["2"] >= 50
    server.stop()
    restarted = start_server(
        server.repository,
        args=ECHO_SERVER_ARGS,
        backend_dir=identity_backends,
    )
    assert canary_state(restarted, ECHO_ROUTER) == {"progressing": 1, "promoted": 0, "rolled_back": 0}
    assert weights_on_metrics(restarted, "request-echo-ab", "request-echo") == {"1": 90, "2": 10}


def test_the_metrics_pass_promtool(server):
    """`promtool check metrics` on our families' exposition, the A/B router's and the
    encoders' (Triton's own `nv_*` counters
    have no `_total` suffix, which promtool flags, so they are left out)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/lint-deploy.sh installs it)")
    assert infer(server, CLASSIFIER_AB, [text_input(["Linted."])]).status_code == 200
    text = requests.get(server.metrics_url, timeout=10).text
    ours = "".join(
        line + "\n" for line in text.splitlines()
        if line.startswith(("triton_rust_", "# HELP triton_rust_", "# TYPE triton_rust_"))
    )
    assert "triton_rust_ab_request_duration_seconds_bucket" in ours, ours
    assert "triton_rust_encoder_fed_tokens_total" in ours, ours
    result = subprocess.run([promtool, "check", "metrics"], input=ours, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- loading: a bad router configuration is a clear load error ------------------------


def router_config(**parameters: str | None) -> dict:
    """sentiment-classifier-ab's configuration as a load override, with `parameters`
    replacing its own (a value of None drops the parameter)."""
    own = {"task": "traffic-split", "target_model": "sentiment-classifier", "arms": "1:50,2:50"}
    own.update(parameters)
    return classifier_config(
        CLASSIFIER_AB, **{key: value for key, value in own.items() if value is not None}
    )


@pytest.fixture
def explicit_with_targets(start_server):
    """A server in explicit mode with sentiment-classifier loaded (not its router)."""
    return start_server(
        MODEL_REPOSITORY,
        args=["--model-control-mode=explicit", "--load-model=sentiment-classifier"],
    )


def with_output_dims(dims) -> dict:
    config = router_config()
    config["output"][0] = dict(config["output"][0], dims=dims)
    return config


BAD_ROUTERS = {
    "weights-not-100": (router_config(arms="1:60,2:30"), "weights summing to 90"),
    "negative-weight": (router_config(arms="1:-50,2:150"), "version:weight pairs"),
    "unknown-version": (router_config(arms="1:50,3:50"), "arm version 3 of 'sentiment-classifier' does not exist"),
    "unknown-target": (router_config(target_model="no-such-model"), "of 'no-such-model' does not exist"),
    "no-target": (router_config(target_model=None), "'target_model' is required"),
    "no-arms": (router_config(arms=None), "'arms' is required"),
    "routes-to-itself": (router_config(target_model=CLASSIFIER_AB), "names the router"),
    "unknown-parameter": (router_config(weights="1:50"), "unknown parameter 'weights'"),
    "onnx-parameter": (
        router_config(intra_op_thread_count="2"),
        "only applies to tasks 'sentiment-classifier', 'feature-extraction', 'text-generation'",
    ),
    "other-tensors": (with_output_dims([-1, 4]), "must serve what 'sentiment-classifier' version 1 serves"),
    "window-too-large": (router_config(stats_window="200000"), "'stats_window' must be at most 100000"),
    "negative-margin": (router_config(latency_regression_percent="-5"), "must be an integer from 0 to 1000"),
    "canary-never-promoted": (router_config(canary_steps="5,25"), "must end at 100"),
    "canary-alpha": (router_config(canary_steps="5,100", canary_alpha="2"), "must be a number above 0 and at most 0.5"),
}


def test_bad_router_configs_fail_their_load_and_a_good_one_serves(explicit_with_targets):
    server = explicit_with_targets
    for case, (config, expected) in BAD_ROUTERS.items():
        response = load_model(server, CLASSIFIER_AB, config)
        assert response.status_code == 400, (case, response.text)
        assert expected in error_message(response), (case, error_message(response))
    assert server.get("/v2/health/live").status_code == 200
    assert load_model(server, CLASSIFIER_AB).status_code == 200
    response = infer(server, CLASSIFIER_AB, [text_input(["Loaded at last."])])
    assert response.status_code == 200, response.text
    assert served_by(response)[1] in {"1", "2"}


def test_a_router_waits_for_its_target_then_gives_up(explicit_with_targets):
    server = explicit_with_targets
    config = router_config(target_model="bert-base", target_ready_timeout_s="1")
    config["output"] = [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [-1, 64]}]
    response = load_model(server, CLASSIFIER_AB, config)
    assert_error(response, "arm version 1 of 'bert-base' is not available after 1s")
    assert "bert-base" not in {
        name for name, entries in repository_index(server).items()
        if any(e.get("state") == "READY" for e in entries)
    }


def test_a_target_reloaded_with_other_outputs_is_named_until_it_is_restored(explicit_with_targets):
    """The target loses an output after the router loaded: the router's requests get a
    503 naming the change (not the target's 400, as if the client were wrong), and serve
    again once the target has its outputs back."""
    server = explicit_with_targets
    assert load_model(server, CLASSIFIER_AB).status_code == 200
    target = classifier_config(
        "sentiment-classifier", task="sentiment-classifier", max_sequence_length="128"
    )
    target["version_policy"] = {"all": {}}
    fewer = dict(target, output=target["output"][:1])
    assert load_model(server, "sentiment-classifier", fewer).status_code == 200
    inputs = [text_input(["Still there?"])]
    response = infer(server, CLASSIFIER_AB, inputs)
    assert_error(
        response,
        "no longer serves what this router serves",
        "sentiment_label",
        "load the router again",
        status=503,
    )
    assert load_model(server, "sentiment-classifier", target).status_code == 200
    response = infer(server, CLASSIFIER_AB, inputs)
    assert response.status_code == 200, response.text


def test_weights_change_with_a_reload(explicit_with_targets):
    server = explicit_with_targets
    assert load_model(server, CLASSIFIER_AB, router_config(arms="1:0,2:100")).status_code == 200
    body = {"inputs": [text_input(["Only two."])]}
    assert {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1] for _ in range(20)} == {"2"}
    assert weights_on_metrics(server) == {"1": 0, "2": 100}
    assert load_model(server, CLASSIFIER_AB, router_config(arms="1:100,2:0")).status_code == 200
    assert {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1] for _ in range(20)} == {"1"}
    assert weights_on_metrics(server) == {"1": 100, "2": 0}
    # The series outlive the reload: version 2's 20 requests are still counted.
    metrics = ab_metrics(server, CLASSIFIER_AB)
    assert metrics[("triton_rust_ab_requests_total", "2")] == 20, metrics
    assert metrics[("triton_rust_ab_requests_total", "1")] == 20, metrics
    # A reload with bad weights fails and the router keeps its last good weights.
    assert load_model(server, CLASSIFIER_AB, router_config(arms="1:10,2:10")).status_code == 400
    assert {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1] for _ in range(20)} == {"1"}
    assert weights_on_metrics(server) == {"1": 100, "2": 0}


def test_weights_change_under_load_without_a_failed_request(explicit_with_targets):
    """Four clients send to the router while it is reloaded with new weights eight
    times: every request is answered 200, and after each reload the new weights serve."""
    server = explicit_with_targets
    assert load_model(server, CLASSIFIER_AB).status_code == 200
    body = {"inputs": [text_input(["Under load."])]}
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []

    def client():
        session = requests.Session()
        while not stop.is_set():
            response = session.post(f"{server.http_url}/v2/models/{CLASSIFIER_AB}/infer",
                                    json=body, timeout=60)
            outcomes.append((response.status_code, response.text[:300]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for arms, only in [("1:0,2:100", "2"), ("1:100,2:0", "1")] * 4:
            assert load_model(server, CLASSIFIER_AB, router_config(arms=arms)).status_code == 200
            versions = {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1]
                        for _ in range(10)}
            assert versions == {only}, (arms, versions)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    failed = [outcome for outcome in outcomes if outcome[0] != 200]
    assert len(outcomes) > 100 and not failed, (len(outcomes), failed[:5])


def weights_on_metrics(server, router=CLASSIFIER_AB, target="sentiment-classifier") -> dict[str, float]:
    return {
        version: value
        for (name, version), value in ab_metrics(server, router, target).items()
        if name == "triton_rust_ab_arm_weight_percent"
    }


# --- streaming ------------------------------------------------------------------------

STREAM_AB = "gpt2-small-stream-ab"
GPT2_REFERENCE = load_reference("gpt2-small")


def stream_through_router(server, prompt: str) -> tuple[list[str], set[str]]:
    """One gRPC stream request to the streaming router: its pieces and the versions its
    responses name."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), answers))
    tensor = grpcclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    parameters = {"do_sample": False, "max_new_tokens": GPT2_REFERENCE["max_new_tokens"]}
    try:
        client.async_stream_infer(
            STREAM_AB, [tensor], parameters=parameters, enable_empty_final_response=True
        )
        pieces, versions = [], set()
        while True:
            result, error = answers.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            versions.add(response.parameters["ab_model_version"].string_param)
            output = result.as_numpy("text_output")
            if output is not None:
                pieces.append(output[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                return pieces, versions
    finally:
        client.stop_stream()
        client.close()


def test_the_streaming_router_relays_the_chosen_versions_stream(server):
    ref = {v: cases[0] for v, cases in GPT2_REFERENCE["versions"].items()}
    prompt = ref["1"]["prompt"]
    assert ref["2"]["prompt"] == prompt
    seen = set()
    for _ in range(12):
        pieces, versions = stream_through_router(server, prompt)
        assert len(versions) == 1, versions  # every response names the same arm
        (version,) = versions
        seen.add(version)
        # Piece by piece, adding up to that version's greedy continuation.
        assert len([p for p in pieces if p]) > 1, pieces
        assert "".join(pieces) == ref[version]["new_text"], (version, pieces)
    assert seen == {"1", "2"}, seen


def test_the_streaming_router_over_sse(server):
    ref = GPT2_REFERENCE["versions"]
    body = {
        "text_input": ref["1"][0]["prompt"],
        "parameters": {"do_sample": False, "max_new_tokens": GPT2_REFERENCE["max_new_tokens"],
                       "user_id": "sse-user"},
    }
    response = server.post(f"/v2/models/{STREAM_AB}/generate_stream", body)
    assert response.status_code == 200, response.text
    events = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert len(events) > 1, events
    text = "".join(e["text_output"] for e in events)
    assert text in {ref["1"][0]["new_text"], ref["2"][0]["new_text"]}, text


# --- sticky users ---------------------------------------------------------------------


def arm_of_user(server, model: str, user, via: str = "parameter") -> str:
    """The version serving `user`, named as a KServe parameter or an x-user-id header."""
    body = {"inputs": [text_input(["Sticky."])]}
    headers = {}
    if via == "parameter":
        body["parameters"] = {"user_id": user}
    else:
        headers["x-user-id"] = str(user)
    response = server.post(f"/v2/models/{model}/infer", body, headers=headers)
    assert response.status_code == 200, response.text
    return served_by(response)[1]


def test_a_user_always_gets_the_same_arm(server):
    users = [f"user-{i}" for i in range(40)] + [7, 12345]
    first = {user: arm_of_user(server, CLASSIFIER_AB, user) for user in users}
    assert set(first.values()) == {"1", "2"}, first
    for _ in range(3):
        assert {user: arm_of_user(server, CLASSIFIER_AB, user) for user in users} == first


def test_users_spread_by_the_weights(server):
    """2000 distinct users over the 50/50 router: a chi-square test of the arm counts."""
    users = 2000
    with ThreadPoolExecutor(max_workers=8) as pool:
        arms = list(pool.map(lambda i: arm_of_user(server, CLASSIFIER_AB, f"u{i}"), range(users)))
    counts = {version: arms.count(version) for version in ("1", "2")}
    expected = {"1": 0.5 * users, "2": 0.5 * users}
    chi_square = sum((counts[v] - expected[v]) ** 2 / expected[v] for v in expected)
    assert chi_square < CHI_SQUARE_1DF_P001, counts


def test_a_bad_user_id_is_refused(server):
    for bad in ["", True, 1.5]:
        body = {"inputs": [text_input(["Who?"])], "parameters": {"user_id": bad}}
        response = server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body)
        assert_error(response, "parameter 'user_id' must be a non-empty string or an integer")


def test_growing_the_canary_moves_users_only_into_it(explicit_with_targets):
    server = explicit_with_targets
    users = [f"user-{i}" for i in range(600)]

    def assignment(arms: str) -> dict:
        assert load_model(server, CLASSIFIER_AB, router_config(arms=arms)).status_code == 200
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(users, pool.map(lambda u: arm_of_user(server, CLASSIFIER_AB, u), users)))

    at_10 = assignment("1:90,2:10")
    at_20 = assignment("1:80,2:20")
    moved = [u for u in users if at_10[u] != at_20[u]]
    assert all(at_10[u] == "1" and at_20[u] == "2" for u in moved), "a user left the canary"
    # About a tenth of the users (those of buckets 80..89) moved into the canary.
    assert 0.05 * len(users) < len(moved) < 0.15 * len(users), len(moved)
    assert sum(v == "2" for v in at_20.values()) > sum(v == "2" for v in at_10.values())
    # Another experiment name assigns the users afresh.
    assert load_model(
        server, CLASSIFIER_AB, router_config(arms="1:80,2:20", experiment="exp-2")
    ).status_code == 200
    with ThreadPoolExecutor(max_workers=8) as pool:
        fresh = dict(zip(users, pool.map(lambda u: arm_of_user(server, CLASSIFIER_AB, u), users)))
    assert fresh != at_20


def test_a_forwarded_header_names_the_user(start_server):
    server = start_server(MODEL_REPOSITORY, args=["--http-header-forward-pattern=x-user-id"])
    users = [f"header-user-{i}" for i in range(30)]
    by_header = {u: arm_of_user(server, CLASSIFIER_AB, u, via="header") for u in users}
    by_parameter = {u: arm_of_user(server, CLASSIFIER_AB, u) for u in users}
    assert by_header == by_parameter
    assert set(by_header.values()) == {"1", "2"}


# --- cancellation ---------------------------------------------------------------------


def target_failures(server) -> tuple[int, int]:
    """Failed requests of gpt2-small's two versions, and their total duration (ns)."""
    stats = server.get("/v2/models/gpt2-small/stats").json()["model_stats"]
    return (
        sum(int(s["inference_stats"]["fail"]["count"]) for s in stats),
        sum(int(s["inference_stats"]["fail"]["ns"]) for s in stats),
    )


def test_a_cancelled_client_request_cancels_the_forwarded_one(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    prompts = np.array([b"Once upon a time"] * 64, dtype=object)
    tensor = grpcclient.InferInput("text_input", [64], "BYTES")
    tensor.set_data_from_numpy(prompts)
    long_job = {"max_new_tokens": 120, "do_sample": True, "seed": 1}
    try:
        started = time.monotonic()
        client.infer(GENERATOR_AB, [tensor], parameters=long_job)
        full_seconds = time.monotonic() - started

        failures_before, failed_ns_before = target_failures(server)
        call = client.async_infer(
            GENERATOR_AB, [tensor], callback=lambda result, error: None, parameters=long_job
        )
        time.sleep(full_seconds / 10)
        call.cancel()
        deadline = time.monotonic() + 30
        while target_failures(server)[0] == failures_before and time.monotonic() < deadline:
            time.sleep(0.05)
        failures, failed_ns = target_failures(server)
        assert failures == failures_before + 1, "the version that got the request cancelled it"
        cancelled_ns = failed_ns - failed_ns_before
        assert cancelled_ns < full_seconds * 1e9 / 2, (
            f"the forwarded request ran {cancelled_ns / 1e9:.3f}s of a {full_seconds:.3f}s job"
        )
        result = client.infer(GENERATOR_AB, [tensor], parameters={"max_new_tokens": 2})
        assert result.as_numpy("generated_text").shape == (64,)
    finally:
        client.close()
    assert server.is_healthy()
