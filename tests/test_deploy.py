"""Offline checks that the deployment files (docker/) agree with the code and with each other.

No Docker engine or cluster is needed: the Dockerfile, the Kubernetes manifests and the
Prometheus files are parsed and cross-checked against backend/Cargo.toml, the model
repository and scripts/common.sh. One test starts the real tritonserver from .deps/ (once
scripts/setup.sh has run; skipped before) with the image's exact CMD arguments, and checks
that every model becomes ready and that the metrics the alert rules use exist.
scripts/lint-deploy.sh runs the linters (hadolint, kubernetes-validate, promtool).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
K8S_DIR = REPO_ROOT / "docker" / "k8s"
MONITORING_DIR = K8S_DIR / "monitoring"
PROMETHEUS_DIR = REPO_ROOT / "docker" / "prometheus"
MODEL_REPOSITORY = REPO_ROOT / "model-repository"
BACKEND_DIR_IN_IMAGE = "/opt/tritonserver/backends"
NAMESPACE = "multi-model-serving"
# The Deployment's GPU-only backend setting (backend/src/config.rs, require_gpu_instances).
REQUIRE_GPU = "--backend-config=rust,require-gpu=true"


# --------------------------------------------------------------------------------------
# A small Dockerfile reader: logical lines (continuations joined, comments dropped),
# grouped into stages.
# --------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Returns (global ARG defaults, stages)."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        logical.append(current.strip())
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


def stage_args(stage: Stage) -> dict[str, str]:
    values = {}
    for instruction in stage.all("ARG"):
        key, _, value = instruction.args.partition("=")
        values[key] = value
    return values


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags such as --from, sources, destination) of a COPY in shell form."""
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"COPY needs a source and a destination: {instruction.args}"
    return flags, words[:-1], words[-1]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def dockerfile():
    return read_dockerfile()


@pytest.fixture(scope="module")
def final_stage(dockerfile):
    return dockerfile[1][-1]


@pytest.fixture(scope="module")
def cargo_lib():
    manifest = tomllib.loads((REPO_ROOT / "backend" / "Cargo.toml").read_text())
    return manifest["package"]["name"], manifest["lib"]


def model_dirs() -> list[Path]:
    return sorted(p for p in MODEL_REPOSITORY.iterdir() if p.is_dir())


def model_backends() -> set[str]:
    backends = set()
    for model in model_dirs():
        match = re.search(r'^\s*backend:\s*"([^"]+)"', (model / "config.pbtxt").read_text(), re.M)
        assert match, f"{model.name}/config.pbtxt names no backend"
        backends.add(match.group(1))
    return backends


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------


def test_every_stage_uses_the_same_pinned_triton_image(dockerfile):
    global_args, stages = dockerfile
    assert re.fullmatch(r"\d{2}\.\d{2}", global_args.get("TRITON_TAG", "")), global_args
    for stage in stages:
        assert stage.base == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3", stage.base


def test_build_stage_builds_the_backend_crate_locked(dockerfile, cargo_lib):
    package, _ = cargo_lib
    build = next(s for s in dockerfile[1] if s.name == "build")
    runs = " ".join(i.args for i in build.all("RUN"))
    match = re.search(r"cargo build ([^&;|]*)", runs)
    assert match, "the build stage runs no cargo build"
    flags = match.group(1).split()
    assert "--release" in flags and "--locked" in flags, flags
    assert flags[flags.index("-p") + 1] == package, f"cargo build -p must name {package}"
    assert "rustup-init" in runs and "sha256sum -c" in runs, "rustup-init must be checksummed"
    assert re.fullmatch(r"\d+\.\d+\.\d+", stage_args(build)["RUST_VERSION"])
    # Every workspace member reaches the build stage: its sources, or (for the tools the
    # image does not ship) its manifest, which cargo needs to read the workspace.
    copied = [copy_parts(i)[1] for i in build.all("COPY")]
    sources = {s.rstrip("/") for group in copied for s in group}
    workspace = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["workspace"]
    for member in workspace["members"]:
        assert member in sources or f"{member}/Cargo.toml" in sources, (
            f"workspace member {member}/ is not copied into the build"
        )
    assert {"Cargo.toml", "Cargo.lock"} <= sources


def test_backend_library_is_copied_by_its_real_name(dockerfile, final_stage, cargo_lib):
    _, lib = cargo_lib
    assert "cdylib" in lib["crate-type"]
    library = f"lib{lib['name']}.so"
    assert library == "libtriton_rust.so"

    build = next(s for s in dockerfile[1] if s.name == "build")
    workdir = build.all("WORKDIR")[-1].args
    expected_source = f"{workdir.rstrip('/')}/target/release/{library}"

    # Triton looks for backend "<name>" in <backend-directory>/<name>/.
    (backend_name,) = model_backends()
    expected_destination = f"{BACKEND_DIR_IN_IMAGE}/{backend_name}/"

    copies = [copy_parts(i) for i in final_stage.all("COPY")]
    matching = [c for c in copies if expected_source in c[1]]
    assert matching, f"the final stage never copies {expected_source}"
    flags, _, destination = matching[0]
    assert flags.get("from") == "build"
    assert destination == expected_destination, destination


def test_onnxruntime_libraries_sit_beside_the_backend(dockerfile, final_stage):
    ort = next(s for s in dockerfile[1] if s.name == "onnxruntime")
    version = stage_args(ort)["ORT_VERSION"]
    # The image ships the ONNX Runtime version the test suite runs against.
    common = (REPO_ROOT / "scripts" / "common.sh").read_text()
    assert f'ONNXRUNTIME_VERSION="{version}"' in common
    assert stage_args(final_stage)["ORT_VERSION"] == version

    runs = " ".join(i.args for i in ort.all("RUN"))
    assert 'onnxruntime-gpu==${ORT_VERSION}' in runs
    assert "sha256sum -c" in runs and re.fullmatch(r"[0-9a-f]{64}", stage_args(ort)["ORT_WHEEL_SHA256"])

    libraries = {
        f"libonnxruntime.so.{version}",
        "libonnxruntime_providers_shared.so",
        "libonnxruntime_providers_cuda.so",
    }
    variables = {"ORT_VERSION": version}
    copied = {}
    for flags, sources, destination in map(copy_parts, final_stage.all("COPY")):
        if flags.get("from") == "onnxruntime":
            for source in sources:
                copied[Path(expand(source, variables)).name] = destination
    assert set(copied) == libraries, copied
    assert set(copied.values()) == {f"{BACKEND_DIR_IN_IMAGE}/rust/"}

    env = " ".join(i.args for i in final_stage.all("ENV"))
    assert "ORT_DISABLE_TELEMETRY=1" in env
    dylib = re.search(r"ORT_DYLIB_PATH=(\S+)", env)
    assert dylib and expand(dylib.group(1), variables) == f"{BACKEND_DIR_IN_IMAGE}/rust/libonnxruntime.so.{version}"


def test_whole_model_repository_is_copied_to_models(final_stage):
    copies = [copy_parts(i) for i in final_stage.all("COPY") if "from" not in copy_parts(i)[0]]
    assert (["model-repository/"], "/models/") in [(s, d) for _, s, d in copies], copies
    assert model_dirs(), "model-repository/ holds no model"
    for model in model_dirs():
        assert (model / "config.pbtxt").is_file(), f"{model.name} has no config.pbtxt"


def test_dockerignore_keeps_build_inputs_and_drops_outputs():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            parts = path.split("/")
            hit = any(
                fnmatch.fnmatch("/".join(parts[: i + 1]), bare)
                or (bare.startswith("**/") and fnmatch.fnmatch(parts[i], bare[3:]))
                for i in range(len(parts))
            )
            if hit:
                result = not negate
        return result

    assert ignored("target/release/libtriton_rust.so")
    assert ignored(".deps/venv/bin/python")
    needed = ["Cargo.toml", "Cargo.lock", "loadgen/Cargo.toml"]
    for root in ["backend", "triton-sys", "model-repository"]:
        needed += [
            str(p.relative_to(REPO_ROOT))
            for p in (REPO_ROOT / root).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    dropped = [p for p in needed if ignored(p)]
    assert not dropped, f".dockerignore drops files the image needs: {dropped[:10]}"


def test_final_stage_runs_tritonserver_as_non_root(final_stage):
    (user,) = final_stage.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root UID"
    assert not gid or (gid.isdigit() and int(gid) > 0)

    exposed = {int(p) for i in final_stage.all("EXPOSE") for p in i.args.split()}
    assert exposed == {8000, 8001, 8002}

    (cmd,) = final_stage.all("CMD")
    argv = exec_form(cmd)
    assert argv[0] == "tritonserver"
    assert "--model-repository=/models" in argv
    assert f"--backend-directory={BACKEND_DIR_IN_IMAGE}" in argv
    ports = dict(a[2:].split("=", 1) for a in argv if a.endswith(("8000", "8001", "8002")))
    assert ports == {"http-port": "8000", "grpc-port": "8001", "metrics-port": "8002"}, ports


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    found = {}
    for resource in kustomization["resources"]:
        for document in load_documents(K8S_DIR / resource):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = set(kustomization["resources"])
    assert all((K8S_DIR / r).is_file() for r in listed), listed
    # model-uploader.yaml is a helper pod applied by hand (docs/deployment.md).
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", "model-uploader.yaml"}
    assert listed == on_disk, f"not in kustomization.yaml: {on_disk - listed}"

    monitoring = yaml.safe_load((MONITORING_DIR / "kustomization.yaml").read_text())
    on_disk = {p.name for p in MONITORING_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(monitoring["resources"]) == on_disk


def test_everything_lives_in_the_namespace(manifests):
    assert ("Namespace", NAMESPACE) in manifests
    for (kind, name), document in manifests.items():
        if kind != "Namespace":
            assert document["metadata"].get("namespace") == NAMESPACE, f"{kind}/{name}"


def triton_container(manifests) -> dict:
    pod = manifests[("Deployment", "triton-rust")]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "triton"]
    return container


def gateway_container(manifests) -> dict:
    pod = manifests[("Deployment", "triton-rust")]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "http-gateway"]
    return container


def test_deployment_probes_hit_triton_health_endpoints(manifests):
    container = triton_container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    # Startup and readiness through the gateway's port "http", liveness on loopback.
    assert {p["name"]: p["containerPort"] for p in gateway_container(manifests)["ports"]} == {
        "http": 8080
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http", probe
    liveness = " ".join(container["livenessProbe"]["exec"]["command"])
    assert "http://127.0.0.1:8000/v2/health/live" in liveness


def test_deployment_args_match_the_image(manifests, final_stage):
    container = triton_container(manifests)
    (cmd,) = final_stage.all("CMD")
    # The image's CMD, plus HTTP on loopback only (reached through the gateway) and GPU
    # instances only (the pod holds a GPU).
    assert container["args"] == exec_form(cmd) + ["--http-address=127.0.0.1", REQUIRE_GPU], (
        "Deployment args and the image CMD drifted apart"
    )
    assert "command" not in container, "keep the image ENTRYPOINT (nvidia_entrypoint.sh)"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORT_DISABLE_TELEMETRY"] == "1"


def test_gateway_serves_the_tested_nginx_config(manifests):
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "triton-gateway"]
    assert sorted(generator["files"]) == ["gateway/nginx.conf", "gateway/triton-guard.js"]
    config = (K8S_DIR / "gateway" / "nginx.conf").read_text()
    gateway = gateway_container(manifests)
    pod = manifests[("Deployment", "triton-rust")]["spec"]["template"]["spec"]
    (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "gateway-config"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "gateway-config"]
    assert volume["configMap"]["name"] == "triton-gateway"
    assert gateway["command"][:3] == ["nginx", "-c", f"{mount['mountPath']}/nginx.conf"]
    assert f"js_path {mount['mountPath']};" in config
    assert "listen 8080;" in config and "server 127.0.0.1:8000;" in config
    # Its temporary files go to the writable /tmp volume (read-only root filesystem).
    (tmp,) = [m for m in gateway["volumeMounts"] if m["name"] == "gateway-tmp"]
    assert tmp["mountPath"] == "/tmp" and "pid /tmp/" in config


def test_deployment_security_and_gpu(manifests, final_stage):
    deployment = manifests[("Deployment", "triton-rust")]
    pod = deployment["spec"]["template"]["spec"]
    (user,) = final_stage.all("USER")
    uid = int(user.args.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        if container["name"] != "http-gateway":
            assert container["image"] == triton_container(manifests)["image"]

    resources = triton_container(manifests)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    # The GPU it holds is used: a model on CPU instances fails its load
    # (tests/test_loading.py, test_a_gpu_only_server_refuses_cpu_instances...).
    assert REQUIRE_GPU in triton_container(manifests)["args"]
    assert resources["requests"]["cpu"], "tokenization runs on the CPU: request it"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The device plugin's nvidia.com/gpu resource schedules the pod; no GPU Feature
    # Discovery labels (a stock EKS/GKE GPU pool has none).
    assert "nodeSelector" not in pod
    assert pod["serviceAccountName"] in {n for k, n in manifests if k == "ServiceAccount"}


def test_model_repository_comes_from_the_pvc(manifests):
    pod = manifests[("Deployment", "triton-rust")]["spec"]["template"]["spec"]
    container = triton_container(manifests)
    repository = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--model-repository="))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == repository]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in manifests
    # ReadWriteOnce: it binds on the default storage class of any cluster (the RWX
    # option for replicas on several nodes is in the file and docs/deployment.md).
    pvc = manifests[("PersistentVolumeClaim", claim)]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in pvc["spec"]
    assert "configMap" not in volume, "models must not come from a ConfigMap"
    # Production pods serve what is on the volume: nothing seeds the demo models.
    assert "initContainers" not in pod


def demo_deployment(manifests) -> dict:
    """The Deployment as docker/k8s/demo/ renders it: its strategic-merge patch adds the
    init container, its JSON patch removes what it names."""
    import copy

    kustomization = yaml.safe_load((K8S_DIR / "demo" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [".."]
    deployment = copy.deepcopy(manifests[("Deployment", "triton-rust")])
    (merge,) = [p for p in kustomization["patches"] if "path" in p]
    (patch,) = load_documents(K8S_DIR / "demo" / merge["path"])
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "triton-rust")
    deployment["spec"]["template"]["spec"]["initContainers"] = (
        patch["spec"]["template"]["spec"]["initContainers"])
    (json_patch,) = [p for p in kustomization["patches"] if "patch" in p]
    assert json_patch["target"] == {"kind": "Deployment", "name": "triton-rust"}
    for operation in yaml.safe_load(json_patch["patch"]):
        assert operation["op"] == "remove"
        *parents, last = [part.replace("~1", "/") for part in operation["path"].split("/")[1:]]
        node = deployment
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[int(last) if isinstance(node, list) else last]
    return deployment


def test_the_demo_seeds_the_example_models_on_cpu(manifests):
    """docker/k8s/demo: the init container seeds the sub-directory the server mounts,
    and the pod asks for no GPU (the example configs are KIND_CPU)."""
    pod = demo_deployment(manifests)["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "triton"]
    assert container["image"] == triton_container(manifests)["image"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    (init,) = pod["initContainers"]
    (seed_mount,) = [m for m in init["volumeMounts"] if m["name"] == mount["name"]]
    script = " ".join(init["command"])
    assert f'repo={seed_mount["mountPath"]}/{mount["subPath"]}' in script
    assert init["image"] == container["image"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    for side in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"][side], side
    assert "tolerations" not in pod
    # Only the GPU-only backend setting goes: the example models run on the CPU.
    assert container["args"] == [a for a in triton_container(manifests)["args"] if a != REQUIRE_GPU]
    for model in MODEL_REPOSITORY.iterdir():
        if model.is_dir():
            assert "KIND_GPU" not in (model / "config.pbtxt").read_text(), model.name


def test_network_policy_admits_clients_and_only_the_monitoring_namespace_to_metrics(manifests):
    policy = manifests[("NetworkPolicy", "triton-rust")]["spec"]
    pod = manifests[("Deployment", "triton-rust")]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    clients, monitoring = policy["ingress"]
    assert "from" not in clients and {p["port"] for p in clients["ports"]} == {"http", "grpc"}
    assert [p["port"] for p in monitoring["ports"]] == ["metrics"]
    assert monitoring["from"][0]["namespaceSelector"]["matchLabels"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == ports
    (dns,) = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}


def test_service_exposes_http_grpc_metrics(manifests):
    service = manifests[("Service", "triton-rust")]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    pod_labels = manifests[("Deployment", "triton-rust")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_hpa_and_pdb_target_the_deployment(manifests):
    deployment = manifests[("Deployment", "triton-rust")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = manifests[("HorizontalPodAutoscaler", "triton-rust")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # Load as an inference server sees it: Triton's queue, per pod, through the
    # prometheus-adapter rules shipped beside the Prometheus files; not CPU.
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}
    scaled_on = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert scaled_on == served == {"triton_queue_duration_us_per_request", "triton_pending_requests"}
    for rule in adapter_rules():
        assert '{namespace!="",pod!=""}' in rule["seriesQuery"], rule
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    pdb = manifests[("PodDisruptionBudget", "triton-rust")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_keda_overlay_replaces_the_hpa_with_the_same_signals(manifests):
    """docker/k8s/keda: a ScaledObject on the Deployment, between the HPA's bounds, on
    Triton's queue (pending requests, queue time), and the base's HPA deleted (KEDA owns
    its own). lint-deploy validates the ScaledObject against KEDA's schema."""
    kustomization = yaml.safe_load((K8S_DIR / "keda" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "scaledobject.yaml"]
    (patch,) = kustomization["patches"]
    deleted = yaml.safe_load(patch["patch"])
    assert deleted["$patch"] == "delete"
    assert (deleted["kind"], deleted["metadata"]["name"]) == ("HorizontalPodAutoscaler", "triton-rust")
    hpa = manifests[("HorizontalPodAutoscaler", "triton-rust")]["spec"]
    scaled = keda_scaled_object()
    assert scaled["metadata"]["namespace"] == NAMESPACE
    assert scaled["spec"]["scaleTargetRef"]["name"] == hpa["scaleTargetRef"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (
        hpa["minReplicas"], hpa["maxReplicas"])
    queries = " ".join(t["metadata"]["query"] for t in scaled["spec"]["triggers"])
    assert "nv_inference_pending_request_count" in queries
    assert "nv_inference_queue_duration_us" in queries
    assert all(t["type"] == "prometheus" for t in scaled["spec"]["triggers"])


def test_servicemonitor_selects_the_metrics_port(manifests):
    (monitor,) = load_documents(MONITORING_DIR / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    service = manifests[("Service", "triton-rust")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["port"] == "metrics"
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_prometheusrule_carries_rules_yml():
    (rule,) = load_documents(MONITORING_DIR / "prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["metadata"]["namespace"] == NAMESPACE
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    assert rule["spec"] == rules, "run docker/prometheus/to_prometheusrule.py after editing rules.yml"


# --------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_service_metrics_port(manifests):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert "rules.yml" in config["rule_files"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "triton-rust"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["namespaces"]["names"] == [NAMESPACE]
    keeps = {
        tuple(r["source_labels"]): r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    service = manifests[("Service", "triton-rust")]
    assert keeps[("__meta_kubernetes_service_label_app_kubernetes_io_name",)] == (
        service["metadata"]["labels"]["app.kubernetes.io/name"]
    )
    port_label = f"__meta_kubernetes_{sd['role']}_port_name"
    assert keeps[(port_label,)] == "metrics"
    # The rules' job label is the scrape job's name (and the ServiceMonitor's Service).
    assert 'job="triton-rust"' in (PROMETHEUS_DIR / "rules.yml").read_text()


def adapter_rules() -> list[dict]:
    """prometheus-adapter's rules for the HPA's per-pod metrics."""
    values = yaml.safe_load((PROMETHEUS_DIR / "prometheus-adapter-values.yaml").read_text())
    assert values["rules"]["default"] is False
    return values["rules"]["custom"]


def keda_scaled_object() -> dict:
    (scaled,) = load_documents(K8S_DIR / "keda" / "scaledobject.yaml")
    return scaled


def rule_metric_names() -> set[str]:
    """Triton's metrics that the alert rules and the autoscaling metrics use."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    queries = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    queries += [rule["seriesQuery"] + rule["metricsQuery"] for rule in adapter_rules()]
    queries += [t["metadata"]["query"] for t in keda_scaled_object()["spec"]["triggers"]]
    return {name for query in queries for name in re.findall(r"\b(nv_[a-z_]+)\b", query)}


def test_rules_use_triton_metrics():
    names = rule_metric_names()
    assert {"nv_inference_request_failure", "nv_inference_queue_duration_us",
            "nv_inference_pending_request_count"} <= names


# --------------------------------------------------------------------------------------
# The image's command line, run on the real tritonserver from scripts/setup.sh
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_command_serves_the_repository_and_rule_metrics(final_stage, tmp_path):
    # scripts/common.sh exports these; its defaults when run on its own.
    deps = REPO_ROOT / ".deps"
    server = os.environ.get("TRITONSERVER_BIN") or str(
        deps / "pytriton" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    )
    backends = os.environ.get("TRITON_RUST_BACKEND_DIR") or str(deps / "backends")
    if not (Path(server).is_file() and (Path(backends) / "rust" / "libtriton_rust.so").is_file()):
        pytest.skip("tritonserver and libtriton_rust.so not set up: run scripts/setup.sh")

    (cmd,) = final_stage.all("CMD")
    ports = {"http-port": _free_port(), "grpc-port": _free_port(), "metrics-port": _free_port()}
    argv = []
    for arg in exec_form(cmd):
        key = arg[2:].split("=", 1)[0]
        if arg == "tritonserver":
            arg = server
        elif key == "model-repository":
            arg = f"--model-repository={MODEL_REPOSITORY}"
        elif key == "backend-directory":
            arg = f"--backend-directory={backends}"
        elif key in ports:
            arg = f"--{key}={ports[key]}"
        argv.append(arg)
    argv += [f"--{k}-address=127.0.0.1" for k in ("http", "grpc", "metrics")]

    log = tmp_path / "tritonserver.log"
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    http = f"http://127.0.0.1:{ports['http-port']}"
    try:
        deadline = time.monotonic() + 120
        metrics_url = f"http://127.0.0.1:{ports['metrics-port']}/metrics"
        while True:
            assert process.poll() is None, f"tritonserver exited:\n{log.read_text()[-4000:]}"
            try:
                # The metrics service starts a little after the HTTP one: wait for both.
                if (requests.get(f"{http}/v2/health/ready", timeout=2).status_code == 200
                        and requests.get(metrics_url, timeout=2).status_code == 200):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"not ready in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.3)
        assert requests.get(f"{http}/v2/health/live", timeout=5).status_code == 200

        index = requests.post(f"{http}/v2/repository/index", json={}, timeout=5).json()
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        assert ready == {m.name for m in model_dirs()}, index

        metrics = requests.get(metrics_url, timeout=5).text
        exported = set(re.findall(r"^(nv_[a-z_]+)[{ ]", metrics, re.M))
        # GPU metrics only exist on a machine with a GPU.
        missing = {n for n in rule_metric_names() if not n.startswith("nv_gpu_")} - exported
        assert not missing, f"the alert rules use metrics tritonserver does not export: {missing}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
