"""Render every kustomization in deploy/k8s and check it offline, strictly.

Built-in kinds go through ``kubernetes-validate`` (strict: unknown fields are errors) against
the newest Kubernetes version it ships; the Prometheus Operator objects through the CRD
schemas vendored in tests/deploy/schemas; alert rules through ``promtool check rules``. The
rest checks that the manifests agree with the server they deploy: ports, probes, config,
drain timing, and the names of the metrics the server really registers.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pruneserve.server.config import ServeConfig

from deploy_support import (
    INSTALL_HINT,
    K8S,
    KUSTOMIZATIONS,
    SERVER_OVERLAYS,
    TARGET_LABELS,
    adapter_values,
    crd_errors,
    dashboard,
    dashboard_queries,
    kubectl,
    metric_names,
    one,
    render,
    render_with_kubectl,
    rule_groups,
    selector_labels,
    serve_yaml,
    server_container,
    server_families,
)
from kustomize_render import render as python_render

K8S_VERSION = kubernetes_validate.latest_version()
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# -- rendering and schema validation -------------------------------------------------------------
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_python_renderer_matches_kubectl(kustomization: str) -> None:
    """The fallback renderer (used where kubectl is missing) produces kubectl's objects exactly."""
    if kubectl() is None:
        pytest.skip("kubectl is not installed; nothing to compare the Python renderer with")
    ours = python_render(K8S / kustomization)
    theirs = render_with_kubectl(K8S / kustomization)

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    assert {key(o): o for o in ours} == {key(o): o for o in theirs}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_kinds_validate_strictly(kustomization: str) -> None:
    objects = render(kustomization)
    builtin = [o for o in objects if o["kind"] not in CRD_KINDS]
    assert builtin
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {K8S_VERSION}: {exc}")


def test_strict_validation_rejects_a_misspelled_field() -> None:
    """The validation above can fail: an unknown field in the Deployment is refused."""
    deployment = copy.deepcopy(one(render("overlays/cpu"), "Deployment", "pruneserve"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_prometheus_operator_objects_match_their_crds(overlay: str) -> None:
    objects = render(overlay)
    crs = [o for o in objects if o["kind"] in CRD_KINDS]
    assert {o["kind"] for o in crs} == CRD_KINDS
    for obj in crs:
        assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_crd_validation_rejects_unknown_and_mistyped_fields() -> None:
    objects = render("overlays/cpu")
    monitor = copy.deepcopy(one(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in crd_errors(monitor))
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    rule["spec"]["groups"][1]["rules"][0]["for"] = 10
    assert crd_errors(rule)


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed; {INSTALL_HINT}")
    rules = tmp_path / "pruneserve.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(render("overlays/cpu"))}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

    broken = tmp_path / "broken.rules.yaml"
    groups = rule_groups(render("overlays/cpu"))
    groups[1]["rules"][0]["expr"] = "histogram_quantile(0.99, sum by (le) (rate(x[5m]))"  # unbalanced
    broken.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0


# -- the manifests agree with the server ------------------------------------------------------------
@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_config_loads_and_matches_ports_and_probes(overlay: str, tmp_path: Path) -> None:
    """The Deployment's args and the ConfigMap's serve.yaml make a valid ServeConfig, and the
    container ports and gRPC probes are the ones that config listens on."""
    from pruneserve.cli import build_parser
    from pruneserve.server.cli import config_from_args

    objects = render(overlay)
    container = server_container(objects)
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(serve_yaml(objects)), encoding="utf-8")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    args = [str(config_file) if a.startswith(mount["mountPath"] + "/") else a for a in container["args"]]
    config = config_from_args(build_parser().parse_args(args))

    assert config.artifacts == ["/models/minilm"]
    artifacts_mount = next(m for m in container["volumeMounts"] if m["name"] == "artifacts")
    assert config.artifacts[0].startswith(artifacts_mount["mountPath"] + "/")
    defaults = ServeConfig()
    assert (config.grpc_port, config.metrics_port) == (defaults.grpc_port, defaults.metrics_port) == (8001, 8002)
    # HTTP/REST (docs/http.md) is on, on Triton's default port, in the image's ServeConfig.
    assert config.http and config.http_port == defaults.http_port == 8000
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.http_port, "grpc": config.grpc_port, "metrics": config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == config.grpc_port
        assert grpc["service"] == ""  # the server's overall health (server/health.py OVERALL)
    from pruneserve.server.health import OVERALL

    assert OVERALL == ""
    # ONNX Runtime threads = the cores the container is granted (Guaranteed QoS).
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert config.threads <= int(resources["limits"]["cpu"])


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_termination_grace_outlasts_drain(overlay: str) -> None:
    objects = render(overlay)
    pod = one(objects, "Deployment", "pruneserve")["spec"]["template"]["spec"]
    container = server_container(objects)
    config = ServeConfig.from_dict(serve_yaml(objects))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.grace_seconds


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_pod_security(overlay: str) -> None:
    objects = render(overlay)
    pod = one(objects, "Deployment", "pruneserve")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        # The read-only root needs a writable /tmp (HOME and TMPDIR of the images).
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    zones = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert zones == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def test_gpu_overlay_asks_for_a_gpu_and_prefers_tensorrt() -> None:
    objects = render("overlays/gpu")
    pod = one(objects, "Deployment", "pruneserve")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert container["image"].endswith("-gpu")
    config = ServeConfig.from_dict(serve_yaml(objects))
    assert config.providers == ["tensorrt", "cuda", "cpu"]
    cache = next(m for m in container["volumeMounts"] if m["name"] == "tensorrt-cache")
    assert config.tensorrt_cache_dir == cache["mountPath"]

    cpu = render("overlays/cpu")
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"]["limits"]
    assert ServeConfig.from_dict(serve_yaml(cpu)).providers == ["cpu"]
    assert server_container(cpu)["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_services_select_the_pods_and_speak_grpc(overlay: str) -> None:
    objects = render(overlay)
    pod_labels = one(objects, "Deployment", "pruneserve")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in server_container(objects)["ports"]}
    service = one(objects, "Service", "pruneserve")
    headless = one(objects, "Service", "pruneserve-headless")
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "grpc"
        assert grpc["targetPort"] in container_ports
        # The HTTP port reaches the container port the ServeConfig's http_port names.
        http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
        assert (http["port"], http["targetPort"], http["appProtocol"]) == (8000, "http", "http")
        assert http["targetPort"] in container_ports
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc", "metrics"}

    pdb = one(objects, "PodDisruptionBudget", "pruneserve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor", "pruneserve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # One Prometheus (selecting on its release label) must pick up both.
    rule_object = one(objects, "PrometheusRule", "pruneserve")
    assert monitor["metadata"]["labels"]["release"] == rule_object["metadata"]["labels"]["release"]
    # The alerts select job="pruneserve": the operator names the job after the Service.
    for group in rule_groups(objects):
        for rule in group["rules"]:
            assert 'job="pruneserve"' in rule["expr"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_hpa_scales_the_deployment_on_an_adapter_metric(overlay: str) -> None:
    objects = render(overlay)
    hpa = one(objects, "HorizontalPodAutoscaler", "pruneserve")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pruneserve"}
    served = {rule["name"]["as"] for rule in adapter_values()["rules"]["custom"]}
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics and set(pods_metrics) <= served
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == ({"Resource", "Pods"} if overlay == "overlays/cpu" else {"Pods"})
    # About one full batch waiting per pod before scaling out.
    target = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")["pods"]["target"]
    assert int(target["averageValue"]) == ServeConfig.from_dict(serve_yaml(render("overlays/cpu"))).max_batch_size


def test_queue_alert_threshold_is_eighty_percent_of_the_queue() -> None:
    objects = render("overlays/cpu")
    rule = next(r for g in rule_groups(objects) for r in g["rules"] if r.get("alert") == "PruneserveQueueSaturated")
    threshold = float(rule["expr"].rsplit(">", 1)[1])
    assert threshold == int(0.8 * ServeConfig.from_dict(serve_yaml(objects)).max_queue_size)


def test_optimizer_job_writes_where_the_server_reads() -> None:
    job_objects = render("optimize")
    job = one(job_objects, "Job", "pruneserve-optimize")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "optimize"
    from pruneserve.cli import build_parser

    parsed = build_parser().parse_args(container["args"])  # the real CLI accepts these flags
    out = str(parsed.out)
    assert out == container["args"][container["args"].index("--out") + 1]
    server = render("overlays/cpu")
    server_pod = one(server, "Deployment", "pruneserve")["spec"]["template"]["spec"]
    claim = lambda spec: next(  # noqa: E731
        v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
    )
    assert claim(pod) == claim(server_pod) == one(server, "PersistentVolumeClaim")["metadata"]["name"]
    assert job["metadata"]["namespace"] == one(server, "Deployment")["metadata"]["namespace"]
    assert out in server_container(server)["args"]
    job_mount = next(m for m in container["volumeMounts"] if m["name"] == "artifacts")
    assert out.startswith(job_mount["mountPath"] + "/")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == server_pod["securityContext"]["runAsUser"]


# -- metric names: alerts, dashboard and adapter use what the server registers ------------------------
def _all_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for group in rule_groups(render("overlays/cpu")):
        for rule in group["rules"]:
            queries[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    for i, expr in enumerate(dashboard_queries(dashboard())):
        queries[f"dashboard query {i}"] = expr
    for rule in adapter_values()["rules"]["custom"]:
        queries[f"adapter {rule['name']['as']}"] = rule["seriesQuery"] + " " + rule["metricsQuery"]
    return queries


def test_every_metric_queried_is_registered_by_the_server() -> None:
    families = server_families()
    used: set[str] = set()
    for where, expr in _all_queries().items():
        names = metric_names(expr)
        unknown = sorted(names - families.keys())
        assert not unknown, f"{where} uses {unknown}, which server/metrics.py does not export"
        used |= names
    # The deploy side covers the brief's signals: latency, throughput, batching, errors,
    # queue, readiness and live quality.
    for required in (
        "pruneserve_request_duration_seconds_bucket",
        "pruneserve_requests_total",
        "pruneserve_inferences_total",
        "pruneserve_executions_total",
        "pruneserve_pending_requests",
        "pruneserve_model_ready",
        "pruneserve_live_fidelity_sum",
        "pruneserve_quality_floor",
    ):
        assert required in used


def test_label_matchers_name_real_labels() -> None:
    families = server_families()
    for where, expr in _all_queries().items():
        for metric, label in selector_labels(expr):
            if metric not in families:
                continue  # reported by test_every_metric_queried_is_registered_by_the_server
            allowed = set(families[metric].labels) | TARGET_LABELS
            assert label in allowed, f"{where}: {metric} has no label {label!r} (has {families[metric].labels})"


def test_outcome_values_in_queries_are_server_outcomes() -> None:
    from pruneserve.server.errors import OUTCOMES

    for where, expr in _all_queries().items():
        for values in re.findall(r'outcome\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr):
            for value in values.split("|"):
                assert value in OUTCOMES, f"{where}: outcome {value!r} is not one of {OUTCOMES}"


def test_metric_name_check_can_fail() -> None:
    assert metric_names("rate(pruneserve_request_total[5m])") - server_families().keys() == {"pruneserve_request_total"}


def test_standalone_prometheus_config_is_valid(tmp_path: Path) -> None:
    """deploy/prometheus/prometheus.yml with the rules exported as its header says."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed; {INSTALL_HINT}")
    source = K8S.parent / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    assert config["scrape_configs"][0]["job_name"] == "pruneserve"
    target = config["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target.endswith(f":{ServeConfig().metrics_port}")
    shutil.copy(source, tmp_path / "prometheus.yml")
    (tmp_path / "pruneserve.rules.yaml").write_text(
        yaml.safe_dump({"groups": rule_groups(render("overlays/cpu"))}), encoding="utf-8"
    )
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
