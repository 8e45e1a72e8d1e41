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
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import (
    MODEL_REPOSITORY,
    assert_error,
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
    "onnx-parameter": (router_config(intra_op_thread_count="2"), "only applies to task"),
    "other-tensors": (with_output_dims([-1, 4]), "must serve what 'sentiment-classifier' version 1 serves"),
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


def test_weights_change_with_a_reload(explicit_with_targets):
    server = explicit_with_targets
    assert load_model(server, CLASSIFIER_AB, router_config(arms="1:0,2:100")).status_code == 200
    body = {"inputs": [text_input(["Only two."])]}
    assert {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1] for _ in range(20)} == {"2"}
    assert load_model(server, CLASSIFIER_AB, router_config(arms="1:100,2:0")).status_code == 200
    assert {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1] for _ in range(20)} == {"1"}
    # A reload with bad weights fails and the router keeps its last good weights.
    assert load_model(server, CLASSIFIER_AB, router_config(arms="1:10,2:10")).status_code == 400
    assert {served_by(server.post(f"/v2/models/{CLASSIFIER_AB}/infer", body))[1] for _ in range(20)} == {"1"}


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
