"""The load-test command (`cargo run -p loadgen -- ...`) against a real tritonserver with
the example repository: health and models, one request per model over HTTP and gRPC,
the A/B distribution check of the router models (and that it fails for wrong weights),
load tests by count and by duration, streams through the router, and failures
reported with their cause."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import REPO_ROOT, free_port

ROUTERS = {"sentiment-classifier-ab": {"v1": 50, "v2": 50}, "gpt2-small-ab": {"v1": 70, "v2": 30}}
STREAM_ROUTER = "gpt2-small-stream-ab"


@pytest.fixture(scope="module")
def loadgen_bin():
    subprocess.run(
        ["cargo", "build", "--locked", "--quiet", "-p", "loadgen"], cwd=REPO_ROOT, check=True
    )
    return REPO_ROOT / "target" / "debug" / "loadgen"


@pytest.fixture
def loadgen(loadgen_bin, server):
    """Runs loadgen against the example server with --json: (exit status, report)."""

    def run(*args: str, protocol: str = "http") -> tuple[int, dict]:
        done = subprocess.run(
            [
                str(loadgen_bin),
                f"--http-url={server.http_url}",
                f"--grpc-url={server.grpc_url}",
                f"--protocol={protocol}",
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)

    return run


def test_health_lists_every_model_version(loadgen, server):
    status, report = loadgen("health")
    assert status == 0
    assert report["server"] == {"live": True, "ready": True, "name": "triton", "version": "2.51.0"}
    listed = {(m["name"], m["version"]) for m in report["models"] if m["state"] == "READY"}
    index = {(m["name"], m["version"]) for m in server.post("/v2/repository/index").json()}
    assert listed == index
    assert {("sentiment-classifier-ab", "1"), ("sentiment-classifier", "2")} <= listed


def test_an_unreachable_server_is_an_error_naming_it(loadgen_bin):
    port = free_port()
    done = subprocess.run(
        [str(loadgen_bin), f"--http-url=127.0.0.1:{port}", "health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"127.0.0.1:{port}" in done.stderr and "refused" in done.stderr, done.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_one_request_per_model(loadgen, protocol):
    status, reports = loadgen("infer", "--param=max_new_tokens=4", protocol=protocol)
    assert status == 0, reports
    by_model = {report["model"]: report for report in reports}
    assert set(by_model) >= {"sentiment-classifier", "bert-base", "gpt2-small", *ROUTERS, STREAM_ROUTER}
    labels = {o["name"]: o for o in by_model["sentiment-classifier-ab"]["answer"]["outputs"]}
    assert labels["sentiment_label"]["values"][0] in {"negative", "neutral", "positive"}
    assert by_model["sentiment-classifier-ab"]["answer"]["parameters"]["ab_test_group"] in {"v1", "v2"}
    stream = by_model[STREAM_ROUTER]
    if protocol == "http":
        assert "gRPC only" in stream["skipped"]
    else:
        assert stream["answer"]["responses"] >= 2, stream
        assert stream["answer"]["parameters"]["ab_test_group"] in {"v1", "v2"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_ab_check_finds_the_configured_weights(loadgen, protocol):
    status, report = loadgen(
        "ab-check", "--model=sentiment-classifier-ab", "-n", "2000", "-c", "8", protocol=protocol
    )
    assert status == 0, report
    assert report["succeeded"] == report["requests"] == 2000 and report["success_rate"] == 1.0
    assert sum(report["arms"].values()) == 2000
    check = report["distribution"]
    assert check["expected_percent"] == ROUTERS["sentiment-classifier-ab"]
    assert check["observed"] == report["arms"]
    assert check["passed"] and check["p_value"] >= check["alpha"] == 0.001
    for key in ("mean", "p50", "p95", "p99", "max"):
        assert report["latency_ms"][key] > 0
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert report["requests_per_s"] > 0


def test_the_ab_check_fails_for_weights_the_router_does_not_use(loadgen):
    # 2000 requests split 50/50 against an expected 90/10: chi-square ≈ 2200, p ≈ 0.
    status, report = loadgen(
        "ab-check", "--model=sentiment-classifier-ab", "--weights=1:90,2:10", "-n", "2000"
    )
    assert status == 1
    assert report["failed"] == 0
    assert not report["distribution"]["passed"] and report["distribution"]["p_value"] < 1e-9


def test_a_load_by_duration_streams_through_the_router_over_grpc(loadgen):
    status, report = loadgen(
        "load", f"--model={STREAM_ROUTER}", "-d", "2", "-c", "4", "--param=max_new_tokens=4",
        protocol="grpc",
    )
    assert status == 0, report
    assert report["requests"] > 10 and report["failed"] == 0
    assert 1.5 < report["duration_s"] < 60
    assert report["first_response_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert set(report["arms"]) == {"v1", "v2"}


def test_streams_end_cleanly_so_the_server_stops_at_once(loadgen_bin, start_server, repository_copy):
    # loadgen reads each stream to its end: a client that resets a stream right after
    # its final response has left a version that never unloads (the server then waits
    # its whole 30 s exit timeout).
    triton = start_server(repository_copy("gpt2-small", "gpt2-small-stream"))
    done = subprocess.run(
        [
            str(loadgen_bin), f"--grpc-url={triton.grpc_url}", "--protocol=grpc", "load",
            "--model=gpt2-small-stream", "-n", "50", "-c", "2", "--param=max_new_tokens=4",
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    started = time.monotonic()
    triton.stop()
    assert time.monotonic() - started < 10, triton.log()[-2000:]
    assert "Exit timeout expired" not in triton.log()


def test_failed_requests_are_counted_with_their_cause(loadgen):
    status, report = loadgen("load", "--model=sentiment-classifier-ab", "-n", "20", "--text=")
    assert status == 1
    assert (report["succeeded"], report["failed"], report["success_rate"]) == (0, 20, 0.0)
    ((message, count),) = report["errors"].items()
    assert count == 20 and "400" in message and "is empty" in message, message


def test_all_checks_every_router_like_the_proxy_test_script(loadgen):
    status, report = loadgen("all", "-n", "300", "--param=max_new_tokens=2", protocol="grpc")
    assert status == 0, report
    assert report["health"]["server"]["ready"]
    assert all(r["passed"] for r in report["inference"])
    checked = {check["model"]: check for check in report["ab_checks"]}
    assert set(checked) == {*ROUTERS, STREAM_ROUTER}
    for model, check in checked.items():
        assert check["requests"] == check["succeeded"] == 300
        expected = ROUTERS.get(model, ROUTERS["gpt2-small-ab"])
        assert check["distribution"]["expected_percent"] == expected
        assert check["distribution"]["passed"], check
    assert report["skipped"] == []
