"""The README's shell examples for versions and runtime model management, run as written.

The server is started with the README's own explicit-mode `tritonserver` command (its
`.deps/` paths mapped to the ones scripts/common.sh exports, plus free loopback ports, and
`bert-base` and `gpt2-small` loaded as well, which the version examples use). Each ```sh
block of the sections "Versions" and "Managing models at runtime", and the A/B section's
example that changes a router's weights, then runs in bash, with `localhost:8000`
pointing at that server and every `curl` failing on an HTTP error, and the effect the
README describes is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

from conftest import (
    MODEL_REPOSITORY,
    REPO_ROOT,
    running_server,
    error_message,
    infer,
    load_model,
    outputs_by_name,
    repository_index,
    text_input,
)

README = REPO_ROOT / "README.md"
VERSIONS = "Versions"
MANAGING = "Managing models at runtime"
AB_TESTING = "A/B testing and canary releases"
README_TRITONSERVER = ".deps/pytriton/pytriton/tritonserver/bin/tritonserver"
README_BACKEND_DIR = ".deps/backends"


def sh_blocks(section: str) -> list[str]:
    """The ```sh blocks under the Markdown heading `section` (up to the next heading)."""
    blocks: list[str] = []
    heading, fence, lines = None, None, []
    for line in README.read_text().splitlines():
        if fence is not None:
            if line.startswith("```"):
                if fence == "sh" and heading == section:
                    blocks.append("\n".join(lines) + "\n")
                fence = None
            else:
                lines.append(line)
        elif line.startswith("```"):
            fence, lines = line[3:].strip(), []
        elif match := re.match(r"#{1,6} (.+)", line):
            heading = match.group(1).strip()
    assert blocks, f"no sh block under '{section}' in README.md"
    return blocks


def readme_server_command() -> tuple[list[str], dict[str, str]]:
    """The README's explicit-mode start command as (argv, environment additions)."""
    (block,) = [b for b in sh_blocks(MANAGING) if "tritonserver" in b]
    words = shlex.split(block.replace("\\\n", " "))
    env = {}
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert env.get("ORT_DISABLE_TELEMETRY") == "1", block
    assert words[0] == README_TRITONSERVER, words[0]
    binary = os.environ["TRITONSERVER_BIN"]
    assert binary.endswith(README_TRITONSERVER.removeprefix(".deps")), binary
    words[0] = binary
    backend_flag = f"--backend-directory={README_BACKEND_DIR}"
    assert backend_flag in words, words
    words[words.index(backend_flag)] = (
        f"--backend-directory={os.environ['TRITON_RUST_BACKEND_DIR']}"
    )
    assert "--model-repository=model-repository" in words, words
    assert "--model-control-mode=explicit" in words, words
    return words, env


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    """A server started from the README's command line, in the repository root."""
    command, env = readme_server_command()
    with running_server(
        MODEL_REPOSITORY,
        tmp_path_factory.mktemp("readme") / "tritonserver.log",
        args=["--load-model=bert-base", "--load-model=gpt2-small"],
        env=env,
        command=command,
        cwd=REPO_ROOT,
    ) as triton:
        yield triton


def run_block(server, block: str) -> str:
    """Runs one README block in bash against `server`; any failed curl fails it."""
    script = (
        "set -euo pipefail\n"
        'curl() { command curl --silent --show-error --fail-with-body "$@"; }\n'
        + block.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
    )
    result = subprocess.run(
        ["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (block, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


def wait_for_state(server, model: str, states: set[str], timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        entries = repository_index(server).get(model, [])
        if entries and all(e.get("state") in states for e in entries):
            return entries
        assert time.monotonic() < deadline, entries
        time.sleep(0.1)


def test_version_examples(readme_server):
    response = load_model(readme_server, "bert-base")  # does nothing if it is loaded
    assert response.status_code == 200, error_message(response)
    (block,) = sh_blocks(VERSIONS)
    out = run_block(readme_server, block)
    assert '"versions":["1","2"]' in out, out
    assert '"model_version":"1"' in out and '"model_version":"2"' in out, out
    assert re.search(r"(^|\})200$", out, re.MULTILINE), out  # the ready check (no newline before)
    assert '"name":"gpt2-small","version":"1"' in out, out  # the statistics


def test_management_examples(readme_server):
    (block,) = [
        b for b in sh_blocks(MANAGING) if "tritonserver" not in b and "$config" not in b
    ]
    out = run_block(readme_server, block)
    # The index lists every model of the repository, loaded or not.
    for model in ("sentiment-classifier", "bert-base", "gpt2-small", "gpt2-small-stream"):
        assert f'"name":"{model}"' in out, out
    entries = wait_for_state(readme_server, "bert-base", {"UNAVAILABLE"})
    assert {e.get("reason") for e in entries} == {"unloaded"}, entries
    # The reload of unchanged files did nothing: both versions still serve.
    entries = repository_index(readme_server)["sentiment-classifier"]
    assert [(e["version"], e["state"]) for e in entries] == [("1", "READY"), ("2", "READY")]


def test_ab_weight_change_example(readme_server):
    """The A/B section's example: read a router's weights, change them with a load, send
    a request with a timeout."""
    router = "sentiment-classifier-ab"
    response = load_model(readme_server, router)
    assert response.status_code == 200, error_message(response)
    (block,) = [b for b in sh_blocks(AB_TESTING) if "1:90,2:10" in b]
    out = run_block(readme_server, block)
    assert out.splitlines()[0] == "1:50,2:50", out
    config = readme_server.get(f"/v2/models/{router}/config").json()
    assert config["parameters"]["arms"]["string_value"] == "1:90,2:10", config["parameters"]
    assert '"ab_test_group":"v' in out, out
    assert readme_server.post(f"/v2/repository/models/{router}/unload").status_code == 200
    wait_for_state(readme_server, router, {"UNAVAILABLE"})


@pytest.mark.skipif(shutil.which("jq") is None, reason="the README's example needs jq")
def test_config_override_example(readme_server):
    (block,) = [b for b in sh_blocks(MANAGING) if "$config" in b]
    run_block(readme_server, block)
    model = "sentiment-classifier"
    config = readme_server.get(f"/v2/models/{model}/config").json()
    assert config["instance_group"][0]["count"] == 1, config["instance_group"]
    assert "model_warmup" not in config or not config["model_warmup"], config["model_warmup"]
    # Only the highest version: the override has no version_policy. Triton unloads the
    # other version in the background after the load returns: wait for it to settle.
    entries = wait_for_state(readme_server, model, {"READY", "UNAVAILABLE"})
    assert [(e["version"], e["state"]) for e in entries] == [
        ("1", "UNAVAILABLE"),
        ("2", "READY"),
    ], entries
    response = infer(readme_server, model, [text_input(["I love it!", "Awful."])])
    assert response.status_code == 200, response.text[:2000]
    assert set(outputs_by_name(response)["sentiment_label"]["data"]) <= {"bad", "meh", "good"}

    # As the README says: a plain load keeps the override; unload, then load, restores
    # config.pbtxt.
    assert load_model(readme_server, model).status_code == 200
    labels = readme_server.get(f"/v2/models/{model}/config").json()["parameters"]["labels"]
    assert labels["string_value"] == "bad,meh,good"
    assert readme_server.post(f"/v2/repository/models/{model}/unload").status_code == 200
    wait_for_state(readme_server, model, {"UNAVAILABLE"})
    response = load_model(readme_server, model)
    assert response.status_code == 200, error_message(response)
    config = readme_server.get(f"/v2/models/{model}/config").json()
    assert config["parameters"]["labels"]["string_value"] == "negative,neutral,positive"
    assert json.dumps(config["version_policy"]) == '{"all": {}}', config["version_policy"]
