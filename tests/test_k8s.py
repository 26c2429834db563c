"""The Kubernetes manifests under deploy/k8s: a Kustomize base and the `gpu` and `cpu-demo`
overlays.

No cluster runs here, so each overlay is rendered by `kubectl kustomize` (the real Kustomize,
no cluster needed) and every object it yields is validated offline against the Kubernetes
OpenAPI schemas of two releases with `kubernetes-validate` (strict: an unknown field fails).
The tests then check the properties a deployment relies on (GPU limit, probes on Triton's
health endpoints, headless Service, nothing exposing Triton, NetworkPolicy, autoscaling
metrics, Ingress affinity and timeouts, Secrets referenced not inlined) and that the
manifests agree with docker-compose.yml (image pins, Triton's flags). Only where no `kubectl`
(nor a stand-alone `kustomize`) exists are the rendering tests skipped, saying so; the files
that are whole objects are validated in any case.
"""
from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from gateway.config import GatewaySettings
from lipsync.paths import REPO_ROOT
from tests.test_deploy import (
    CONTROL_KEY_VAR,
    RESTRICTED_FLAG,
    compose_config,
    restricted_flags,
)

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu-demo")
SCHEMA_VERSIONS = ("1.30.0", "1.37.0")
"""Kubernetes releases the objects are validated against: the oldest release we claim to run
on (every API used here, autoscaling/v2, policy/v1, networking.k8s.io/v1, is GA there) and the
newest one kubernetes-validate ships schemas for."""

SECRET_ENV = {
    CONTROL_KEY_VAR: ("lipsync-triton-control", "key"),
    "LIPSYNC_AUTH_TOKEN": ("lipsync-gateway-tokens", "auth-token"),
    "LIPSYNC_ADMIN_TOKEN": ("lipsync-gateway-tokens", "admin-token"),
}
"""Environment variables that carry secrets: (Secret name, key) they must be read from."""

TRITON_GPU_START_S = 900
"""The longest first start of a GPU Triton (TensorRT engine builds), docker-compose.yml's
TRITON_START_PERIOD default."""

Obj = dict[str, Any]


# ----------------------------------------------------------------------------- rendering


def _kustomize_command() -> list[str] | None:
    """`kubectl kustomize` (Kustomize built into kubectl), else a stand-alone `kustomize build`,
    else None."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _kustomize_version(command: list[str]) -> str:
    """The Kustomize version of that command, e.g. "v5.5.0" ("" when it does not say)."""
    if command[0] == "kubectl":
        proc = subprocess.run(["kubectl", "version", "--client", "-o", "json"],
                              capture_output=True, text=True, timeout=60, check=False)
        return str(json.loads(proc.stdout or "{}").get("kustomizeVersion", ""))
    proc = subprocess.run(["kustomize", "version"], capture_output=True, text=True, timeout=60,
                          check=False)
    match = re.search(r"v?\d+\.\d+\.\d+", proc.stdout)
    return match[0] if match else ""


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    """Every object `kubectl kustomize deploy/k8s/overlays/OVERLAY` yields.

    Skips (the only skip here) when neither kubectl nor kustomize is installed; fails when the
    installed one is older than Kustomize v5 or refuses the overlay.
    """
    command = _kustomize_command()
    if command is None:
        pytest.skip("no kubectl (nor kustomize) on PATH, so the overlays cannot be rendered: "
                    "install a kubectl >= 1.27 (it carries Kustomize v5); Debian 12's "
                    "kubernetes-client 1.20 carries Kustomize v2 and cannot render them")
    version = _kustomize_version(command)
    major = re.match(r"v?(\d+)\.", version)
    assert major and int(major[1]) >= 5, (
        f"{' '.join(command)} carries Kustomize {version or '(unknown)'}; the overlays need "
        "v5 (kubectl >= 1.27)")
    proc = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(command)} refused overlays/{overlay}:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def objects(overlay: str, kind: str) -> list[Obj]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> Obj:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"overlays/{overlay} has {len(found)} {kind} named {name}"
    return found[0]


def pod_spec(overlay: str, deployment: str) -> Obj:
    return one(overlay, "Deployment", deployment)["spec"]["template"]["spec"]


def container(overlay: str, deployment: str) -> Obj:
    containers = pod_spec(overlay, deployment)["containers"]
    assert len(containers) == 1, f"{deployment} runs {len(containers)} containers"
    return containers[0]


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector selects an object with `labels`."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def triton_labels(overlay: str) -> dict[str, str]:
    return one(overlay, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]


def gateway_labels(overlay: str) -> dict[str, str]:
    return one(overlay, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]


def pod_specs(overlay: str) -> Iterator[tuple[str, Obj]]:
    for o in render(overlay):
        if o["kind"] == "Deployment":
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield o["metadata"]["name"], o["spec"]


def compose_triton_image() -> str:
    return str(compose_config()["services"]["triton"]["image"])


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_for_kubernetes(overlay: str) -> None:
    docs = render(overlay)
    assert {o["kind"] for o in docs} >= {"Namespace", "Deployment", "Service", "Ingress",
                                        "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                        "NetworkPolicy"}
    for version in SCHEMA_VERSIONS:
        for o in docs:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {o['kind']}/{o['metadata']['name']} is not a valid "
                            f"Kubernetes {version} object: {exc.message} at {list(exc.path)}")


def whole_object_files() -> list[Path]:
    """Manifest files of whole objects (not kustomizations, not patches)."""
    files = sorted((K8S / "base").glob("*.yaml")) + sorted((K8S / "tools").glob("*.yaml"))
    files += [K8S / "overlays" / "gpu" / "engine-cache.yaml"]
    return [f for f in files if f.name != "kustomization.yaml"]


@pytest.mark.parametrize("path", whole_object_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_files_are_valid_without_rendering(path: Path) -> None:
    """Runs with or without kubectl: each file of whole objects is valid as written."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for o in docs:
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(o, version, strict=True)


# ----------------------------------------------------------------------------- Triton


def test_triton_gets_one_gpu_in_the_gpu_overlay_and_none_in_cpu_demo() -> None:
    resources = container("gpu", "triton")["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec("gpu", "triton")["tolerations"])
    assert "--allow-gpu-metrics=true" in container("gpu", "triton")["args"]
    cpu_demo = json.dumps(render("cpu-demo"))
    assert "nvidia.com/gpu" not in cpu_demo and "allow-gpu-metrics" not in cpu_demo


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_probes_use_its_health_endpoints(overlay: str) -> None:
    c = container(overlay, "triton")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready"),
                        ("startupProbe", "/v2/health/ready")):
        assert c[probe]["httpGet"]["path"] == path, f"{probe}: {c[probe]}"
        assert ports[c[probe]["httpGet"]["port"]] == 8000
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= TRITON_GPU_START_S, (
        "the startup probe gives up before a first GPU start (engine builds) can finish")
    # --strict-readiness: ready means every model of --load-model=* is loaded
    assert {"--strict-readiness=true", "--load-model=*"} <= set(c["args"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_model_control_needs_the_key_from_a_secret(overlay: str) -> None:
    c = container(overlay, "triton")
    flags = restricted_flags(c["args"])
    compose_flags = restricted_flags(compose_config()["services"]["triton"]["command"])
    assert set(flags) == {"grpc-restricted-protocol", "http-restricted-api"}
    for name, match in flags.items():
        assert match["key"] == f"$({CONTROL_KEY_VAR})", "the key must come from the environment"
        # the same protocols and header as docker-compose.yml (proven on the real server there)
        assert (match["protocols"], match["header"]) == (compose_flags[name]["protocols"],
                                                         compose_flags[name]["header"])
    assert env_of(c)[CONTROL_KEY_VAR]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET_ENV[CONTROL_KEY_VAR][0], "key": SECRET_ENV[CONTROL_KEY_VAR][1]}
    # the gateway reads the same Secret key; no other pod does
    gateway = env_of(container(overlay, "gateway"))[CONTROL_KEY_VAR]
    assert gateway["valueFrom"] == env_of(c)[CONTROL_KEY_VAR]["valueFrom"]
    holders = [
        name for name, spec in pod_specs(overlay) if SECRET_ENV[CONTROL_KEY_VAR][0] in json.dumps(spec)
    ]
    assert sorted(holders) == ["gateway", "triton"]


def test_triton_runs_the_compose_files_server_flags() -> None:
    """The GPU overlay's Triton gets every flag docker-compose.yml gives it (the key read from
    the Secret instead of .env), so the two GPU deployments cannot drift apart."""
    compose = compose_config()["services"]["triton"]["command"]
    args = container("gpu", "triton")["args"]
    expected = []
    for flag in compose:
        match = RESTRICTED_FLAG.fullmatch(flag)
        if match:
            flag = flag[: match.start("key")] + f"$({CONTROL_KEY_VAR})"
        expected.append(flag)
    assert sorted(expected) == sorted(args)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_is_reached_through_a_headless_service_only(overlay: str) -> None:
    labels = triton_labels(overlay)
    services = [s for s in objects(overlay, "Service") if selects(s["spec"].get("selector", {}), labels)]
    assert [s["metadata"]["name"] for s in services] == ["triton"]
    service = services[0]["spec"]
    assert service["clusterIP"] == "None" and service.get("type", "ClusterIP") == "ClusterIP"
    assert not service.get("publishNotReadyAddresses", False)
    for s in objects(overlay, "Service"):
        assert s["spec"].get("type", "ClusterIP") == "ClusterIP", f"{s['metadata']['name']} is exposed"
    backends = {p["backend"]["service"]["name"] for i in objects(overlay, "Ingress")
                for r in i["spec"]["rules"] for p in r["http"]["paths"]}
    assert "triton" not in backends and backends == {"gateway"}
    # the gateway's Triton URL is that Service's gRPC port
    host, port = env_of(container(overlay, "gateway"))["LIPSYNC_TRITON_URL"]["value"].rsplit(":", 1)
    assert host.split(".")[0] == "triton"
    grpc = next(p for p in service["ports"] if p["name"] == "grpc")
    assert int(port) == grpc["port"] == 8001


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_metrics_port_is_annotated_for_prometheus(overlay: str) -> None:
    annotations = one(overlay, "Deployment", "triton")["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in container(overlay, "triton")["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_only_gateway_pods_reach_triton(overlay: str) -> None:
    tri, gw = triton_labels(overlay), gateway_labels(overlay)
    policies = [p for p in objects(overlay, "NetworkPolicy")
                if selects(p["spec"]["podSelector"].get("matchLabels", {}), tri)]
    assert len(policies) == 1, "no NetworkPolicy (or several) selects the Triton pods"
    spec = policies[0]["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec["egress"] == [], "Triton needs no outbound connection"
    named = {p["name"]: p["containerPort"] for p in container(overlay, "triton")["ports"]}
    reachable_by_gateway: set[int] = set()
    for rule in spec["ingress"]:
        assert rule.get("from"), f"an ingress rule admits every source: {rule}"
        assert rule.get("ports"), f"an ingress rule admits every port: {rule}"
        ports = {named.get(p["port"], p["port"]) for p in rule["ports"]}
        for peer in rule["from"]:
            assert "ipBlock" not in peer, f"an ingress rule admits addresses: {peer}"
            pods = peer.get("podSelector", {}).get("matchLabels", {})
            if "namespaceSelector" not in peer and selects(pods, gw):
                reachable_by_gateway |= ports
            else:  # anything else (Prometheus) may read the metrics port only
                assert ports == {named["metrics"]}, f"{peer} may reach {ports}"
    assert reachable_by_gateway == {named["grpc"]}


# ----------------------------------------------------------------------------- autoscaling


def adapter_rule() -> Obj:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert len(rules) == 1
    return dict(rules[0])


def test_prometheus_adapter_rule_is_queue_time_per_request() -> None:
    rule = adapter_rule()
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    numerator, denominator = query.split(" / ", 1)
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>}" in numerator
    assert "nv_inference_request_success{<<.LabelMatchers>>}" in denominator
    assert query.count("by (<<.GroupBy>>)") == 2


def test_triton_scales_on_queue_time_per_request() -> None:
    hpa = one("gpu", "HorizontalPodAutoscaler", "triton")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    assert hpa["minReplicas"] >= 2
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # microseconds: between the 2 ms batching delay and the ~15 ms Triton budget of a frame
    assert 2000 < int(metric["pods"]["target"]["averageValue"]) < 15000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_scales_on_cpu_and_both_have_disruption_budgets(overlay: str) -> None:
    hpa = one(overlay, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "gateway" and hpa["minReplicas"] >= 2
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in container(overlay, "gateway")["resources"]["requests"], (
        "CPU utilization needs a CPU request")
    for labels in (triton_labels(overlay), gateway_labels(overlay)):
        budgets = [b for b in objects(overlay, "PodDisruptionBudget")
                   if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(budgets) == 1, f"{len(budgets)} PodDisruptionBudgets select {labels}"
    if overlay == "cpu-demo":  # no prometheus-adapter needed to run the demo
        assert not [h for h in objects(overlay, "HorizontalPodAutoscaler")
                    if h["spec"]["scaleTargetRef"]["name"] == "triton"]


# ----------------------------------------------------------------------------- gateway


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_and_drain(overlay: str) -> None:
    deployment = one(overlay, "Deployment", "gateway")
    assert deployment["spec"]["replicas"] >= 2
    c = container(overlay, "gateway")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "http": 8085}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain_s = int(command[1])
    grace_s = pod_spec(overlay, "gateway")["terminationGracePeriodSeconds"]
    assert grace_s > drain_s, "the grace period ends before the preStop drain"
    if overlay == "gpu":
        assert drain_s >= 120, "live sessions get less than 2 min to end"
    env = env_of(c)
    assert env["LIPSYNC_PACKAGES_ROOT"]["value"] == "/packages"
    assert any(m["mountPath"] == "/packages" and m.get("readOnly") for m in c["volumeMounts"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_keeps_websocket_sessions_on_one_pod_over_tls(overlay: str) -> None:
    ingresses = {i["metadata"]["name"]: i for i in objects(overlay, "Ingress")}
    assert set(ingresses) == {"gateway", "gateway-grpc"}
    prefix = "nginx.ingress.kubernetes.io/"
    for name, ingress in ingresses.items():
        notes = {k.removeprefix(prefix): v for k, v in ingress["metadata"]["annotations"].items()}
        assert int(notes["proxy-read-timeout"]) >= 3600 and int(notes["proxy-send-timeout"]) >= 3600
        assert ingress["spec"]["ingressClassName"] == "nginx"
        tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
        assert {r["host"] for r in ingress["spec"]["rules"]} <= tls_hosts
        assert {t["secretName"] for t in ingress["spec"]["tls"]} == {"lipsync-tls"}
        if name == "gateway":
            assert notes["affinity"] == "cookie" and notes["affinity-mode"] == "persistent"
            assert notes["session-cookie-name"] and notes["session-cookie-secure"] == "true"
        else:
            assert notes["backend-protocol"] == "GRPC"
    port_of = {i: p["backend"]["service"]["port"]["name"] for i, ing in ingresses.items()
               for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
    assert port_of == {"gateway": "http", "gateway-grpc": "grpc"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    docs = render(overlay)
    assert not [o for o in docs if o["kind"] == "Secret"], "a Secret is part of the manifests"
    for name, spec in pod_specs(overlay):
        for c in spec["containers"] + spec.get("initContainers", []):
            for var, entry in env_of(c).items():
                if re.search(r"TOKEN|KEY|PASSWORD|SECRET", var):
                    assert "value" not in entry, f"{name}: {var} is inlined"
                    assert "secretKeyRef" in entry["valueFrom"], f"{name}: {var} not from a Secret"
            assert "envFrom" not in c or all("configMapRef" not in e for e in c["envFrom"])
    gateway = env_of(container(overlay, "gateway"))
    for var, (secret, key) in SECRET_ENV.items():
        assert gateway[var]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_environment_names_real_settings(overlay: str) -> None:
    known = {f"LIPSYNC_{name.upper()}" for name in GatewaySettings.model_fields}
    known |= {"LIPSYNC_PACKAGES_DIR", "LIPSYNC_CACHE_DIR", "LIPSYNC_LOG_LEVEL"}
    assert set(env_of(container(overlay, "gateway"))) - known == set()


# ----------------------------------------------------------------------------- images, volumes


def test_images_are_pinned_as_in_compose() -> None:
    compose = compose_config()["services"]
    assert container("gpu", "triton")["image"] == compose["triton"]["image"]
    for overlay in OVERLAYS:
        assert container(overlay, "gateway")["image"] == compose["gateway"]["image"]
        for _, spec in pod_specs(overlay):
            for c in spec["containers"] + spec.get("initContainers", []):
                name, _, tag = c["image"].rpartition(":")
                assert name and tag and tag != "latest", f"{c['image']} is not pinned"
    ngc_tag = compose_triton_image().rsplit(":", 1)[1]
    assert container("cpu-demo", "triton")["image"] == f"lipsync-triton-cpu:{ngc_tag}"
    tools = yaml.safe_load((K8S / "tools" / "publisher.yaml").read_text())
    assert not tools["spec"]["containers"][0]["image"].endswith(":latest")


def test_engine_cache_is_mounted_where_the_gpu_profile_caches_engines() -> None:
    from export.model_repo import ENGINE_CACHE_ROOT

    mounts = {m["name"]: m["mountPath"] for m in container("gpu", "triton")["volumeMounts"]}
    assert mounts["engine-cache"] == ENGINE_CACHE_ROOT
    volumes = {v["name"]: v for v in pod_spec("gpu", "triton")["volumes"]}
    claim = volumes["engine-cache"]["persistentVolumeClaim"]["claimName"]
    assert one("gpu", "PersistentVolumeClaim", claim)
    models = volumes["models"]["persistentVolumeClaim"]
    assert models["readOnly"] and one("gpu", "PersistentVolumeClaim", models["claimName"])
    assert (
        mounts["models"] == "/models" and "--model-repository=/models" in container("gpu", "triton")["args"]
    )


def test_cpu_demo_needs_no_storage_class_and_gets_the_demo_from_an_image() -> None:
    assert objects("cpu-demo", "PersistentVolumeClaim") == []
    for deployment, target in (("triton", "/models"), ("gateway", "/packages")):
        spec = pod_spec("cpu-demo", deployment)
        [init] = spec["initContainers"]
        assert init["image"] == "lipsync-demo-content:0.1.0"
        assert init["command"][0] == "cp" and init["command"][-1] == f"{target}/"
        volume = next(m["name"] for m in init["volumeMounts"] if m["mountPath"] == target)
        assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[volume]
    # the CPU profile's Python backend moves a UNet batch of 8 (~5 MiB each way), as locally
    args = container("cpu-demo", "triton")["args"]
    assert "--backend-config=python,shm-default-byte-size=16777216" in args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay: str) -> None:
    [namespace] = objects(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    tools = yaml.safe_load((K8S / "tools" / "publisher.yaml").read_text())
    specs = [*pod_specs(overlay), ("publisher", tools["spec"])]
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"


# ----------------------------------------------------------------------------- the CPU images


def _dockerfile(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((REPO_ROOT / "docker" / name).read_bytes()))


@pytest.mark.parametrize("name", ["triton-cpu.Dockerfile", "demo-content.Dockerfile"])
def test_cpu_demo_dockerfiles_pass_hadolint(name: str) -> None:
    local = Path(sys.executable).parent / "hadolint"
    tool = str(local) if local.exists() else shutil.which("hadolint")
    assert tool, "hadolint is not installed; run scripts/setup.sh"
    proc = subprocess.run([tool, str(REPO_ROOT / "docker" / name)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_triton_cpu_image_is_the_compose_image_plus_what_the_cpu_models_import() -> None:
    """Every module model_repository/python_onnx/model.py imports is in the standard library,
    comes with the NGC image's Python backend (numpy, its utilities) or is installed, pinned,
    by docker/triton-cpu.Dockerfile."""
    parser = _dockerfile("triton-cpu.Dockerfile")
    assert parser.baseimage == compose_triton_image()
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    installed = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][\w.]*)", runs))
    # the NGC 24.08 image's Python is 3.10: the model's code must parse there
    source = (REPO_ROOT / "model_repository" / "python_onnx" / "model.py").read_text()
    tree = ast.parse(source, feature_version=(3, 10))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    with_the_image = {"numpy", "triton_python_backend_utils"}
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party - with_the_image == set(installed), (
        f"the CPU models import {sorted(third_party)}; the image adds {installed}")
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_demo_content_image_holds_the_cpu_models_and_the_demo_package() -> None:
    parser = _dockerfile("demo-content.Dockerfile")
    copies = {tuple(i["value"].split()) for i in parser.structure if i["instruction"] == "COPY"}
    assert copies == {("model_repository/cpu/", "/content/models/"),
                      ("packages/demo/", "/content/packages/demo/")}
    # the init containers copy exactly those folders
    for deployment, source in (("triton", "/content/models/."), ("gateway", "/content/packages/.")):
        assert source in pod_spec("cpu-demo", deployment)["initContainers"][0]["command"]
    allowed = {ln[1:].rstrip("/") for ln in
               (REPO_ROOT / "docker" / "demo-content.Dockerfile.dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    assert allowed == {"model_repository/cpu", "packages/demo"}
