"""Shared helpers of the deploy tests: rendering, schemas, metric names, PromQL extraction.

Kept out of conftest.py so test modules can import them by name (the tests/ folders are not
packages; pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

import kustomize_render

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: Every kustomization a user applies (tests/deploy renders and validates each).
KUSTOMIZATIONS: tuple[str, ...] = ("overlays/cpu", "overlays/gpu", "optimize")
SERVER_OVERLAYS: tuple[str, ...] = ("overlays/cpu", "overlays/gpu")
INSTALL_HINT = "install it with `bash deploy/scripts/install-system-deps.sh` (as root) or `make system-deps`"

Obj = dict[str, Any]


# -- rendering ---------------------------------------------------------------------------------
def kubectl() -> str | None:
    """Path of a kubectl that has the built-in kustomize, or None.

    ``PRUNESERVE_RENDERER=python`` pretends there is none, to run the suite as on a machine
    without kubectl."""
    if os.environ.get("PRUNESERVE_RENDERER") == "python":
        return None
    path = shutil.which("kubectl")
    if path is None:
        return None
    probe = subprocess.run([path, "kustomize", "--help"], capture_output=True, text=True, timeout=60)
    return path if probe.returncode == 0 else None


def render_with_kubectl(directory: Path) -> list[Obj]:
    """``kubectl kustomize DIR`` parsed into objects."""
    exe = kubectl()
    assert exe is not None
    out = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.cache
def _render_cached(relative: str) -> tuple[str, str]:
    directory = K8S / relative
    objects = render_with_kubectl(directory) if kubectl() else kustomize_render.render(directory)
    return json.dumps(objects), ("kubectl" if kubectl() else "python")


def render(relative: str) -> list[Obj]:
    """Render ``deploy/k8s/<relative>`` (kubectl if present, else the Python renderer); a fresh copy."""
    text, _ = _render_cached(relative)
    return json.loads(text)


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    """The single object of ``kind`` (and ``name``) in ``objects``."""
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def server_container(objects: list[Obj]) -> Obj:
    """The ``server`` container of the pruneserve Deployment."""
    deployment = one(objects, "Deployment", "pruneserve")
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server")


def serve_yaml(objects: list[Obj]) -> Obj:
    """The serve.yaml the rendered ConfigMap carries, parsed."""
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("pruneserve-config"))
    return yaml.safe_load(cm["data"]["serve.yaml"])


# -- CRD schemas -----------------------------------------------------------------------------
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def structural_to_jsonschema(schema: Any) -> Any:
    """Turn a CRD's structural OpenAPI v3 schema into a strict JSON Schema.

    Strict as the API server's ``fieldValidation=Strict``: objects with declared properties
    refuse unknown fields unless marked ``x-kubernetes-preserve-unknown-fields``;
    ``x-kubernetes-int-or-string`` becomes integer-or-string; ``nullable`` admits null.
    """
    if isinstance(schema, list):
        return [structural_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: structural_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = structural_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_jsonschema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue
        elif key == "pattern" and "(?i)" in value[1:]:
            # RE2 (Go) takes inline flags anywhere; Python only at the start.
            out[key] = "(?i)" + value.replace("(?i)", "")
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A strict validator for one vendored Prometheus Operator CRD (``ServiceMonitor``...)."""
    data = json.loads((SCHEMAS / f"{kind.lower()}-v1.json").read_text(encoding="utf-8"))
    schema = structural_to_jsonschema(data["openAPIV3Schema"])
    schema["properties"]["metadata"] = _OBJECT_META
    schema["properties"]["apiVersion"] = {"const": f"{data['group']}/{data['version']}"}
    schema["properties"]["kind"] = {"const": data["kind"]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def crd_errors(obj: Obj) -> list[str]:
    """Schema violations of a Prometheus Operator object, as readable strings."""
    validator = crd_validator(obj["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# -- metrics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A metric family the server registers: its name, type and label names."""

    name: str
    type: str
    labels: tuple[str, ...]

    def sample_names(self) -> set[str]:
        """Series names a query may use for this family."""
        if self.type == "counter":
            return {f"{self.name}_total"}
        if self.type in ("histogram", "gaugehistogram"):
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        if self.type == "summary":
            return {self.name, f"{self.name}_sum", f"{self.name}_count"}
        if self.type == "info":
            return {f"{self.name}_info"}
        return {self.name}


def server_families() -> dict[str, Family]:
    """Every family :class:`pruneserve.server.metrics.Metrics` registers, by sample name."""
    from prometheus_client.registry import CollectorRegistry

    from pruneserve.server.metrics import Metrics

    metrics = Metrics(CollectorRegistry(auto_describe=True))
    families: dict[str, Family] = {}
    for attr in vars(metrics).values():
        name = getattr(attr, "_name", None)
        kind = getattr(attr, "_type", None)
        if not name or not kind:
            continue
        family = Family(name, kind, tuple(getattr(attr, "_labelnames", ())))
        for sample in family.sample_names():
            families[sample] = family
    assert families, "server/metrics.py registered no metrics"
    return families


_METRIC_RE = re.compile(r"\bpruneserve_[a-zA-Z0-9_]+")
# `metric{matchers}`: used to check the label names queries filter on.
_SELECTOR_RE = re.compile(r"\b(pruneserve_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels Prometheus itself attaches to every scraped series (target labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container", "le"}


def metric_names(expr: str) -> set[str]:
    """``pruneserve_*`` series names an expression or query uses."""
    return set(_METRIC_RE.findall(expr))


def selector_labels(expr: str) -> Iterator[tuple[str, str]]:
    """(metric, label) for every label matcher on a ``pruneserve_*`` selector."""
    for metric, body in _SELECTOR_RE.findall(expr):
        for label in _MATCHER_RE.findall(body):
            yield metric, label


def rule_groups(objects: list[Obj]) -> list[Obj]:
    """The ``spec.groups`` of the rendered PrometheusRule (a plain Prometheus rules file body)."""
    return one(objects, "PrometheusRule", "pruneserve")["spec"]["groups"]


def dashboard() -> Obj:
    """The Grafana dashboard JSON."""
    return json.loads((DEPLOY / "grafana" / "pruneserve-dashboard.json").read_text(encoding="utf-8"))


def dashboard_queries(board: Obj) -> list[str]:
    """Every PromQL expression in the dashboard's panels and template variables."""
    queries: list[str] = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append(target["expr"])
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            queries.append(str(query))
    return queries


def adapter_values() -> Obj:
    """deploy/k8s/prometheus-adapter/values.yaml."""
    return yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))


def adapter_query(rule: Obj, *, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends for ``rule`` and these pods (its Go template filled)."""
    series = metric_names(rule["seriesQuery"])
    assert len(series) == 1, rule["seriesQuery"]
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series.pop())
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )
