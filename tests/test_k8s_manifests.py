"""The Kubernetes manifests under config/k8s, checked without a cluster.

Built-in kinds are validated (strict: unknown fields refused) against the Kubernetes
JSON schemas shipped with ``kubernetes-validate``, for the oldest and the newest
Kubernetes version we support. Custom resources (KEDA's ScaledObject, the Prometheus
Operator's ServiceMonitor) and the Kustomization have no schema there: their structure
and their cross-references are checked by hand. Then the pieces are checked against each
other and against the code: ports, probes, label selectors, the metric name, the drain
budget, and that the environment really loads as Settings.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import load_settings
from gateway.metrics import Metrics
from gateway.node import STOP_BUDGET

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "config" / "k8s"
DASHBOARD = ROOT / "config" / "grafana" / "presence-dashboard.json"
VERSIONS = ("1.29.0", "1.37.0")
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"),
                ("monitoring.coreos.com/v1", "ServiceMonitor"),
                ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
METRIC = "presence_autoscaler_desired_replicas"


def _load() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


DOCS = _load()
BUILTIN = [(p, d) for p, d in DOCS if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_every_manifest_has_a_known_kind() -> None:
    assert len(DOCS) >= 10
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ScaledObject", "ServiceMonitor", "ConfigMap", "Kustomization"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("path", "doc"), BUILTIN,
                         ids=[f"{p}:{d['kind']}:{d['metadata']['name']}" for p, d in BUILTIN])
def test_builtin_kinds_validate_against_the_schemas(path: str, doc: dict[str, Any],
                                                    version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    """Guard against a validator that accepts anything (e.g. a missing schema)."""
    bad = copy.deepcopy(one("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "ws"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    typo = copy.deepcopy(one("HorizontalPodAutoscaler"))
    typo["spec"]["maxReplica"] = typo["spec"].pop("maxReplicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSIONS[-1], strict=True)


# -- custom resources: structure by hand ------------------------------------------------

def test_kustomization_lists_existing_base_files() -> None:
    k = one("Kustomization")
    assert k["namespace"] == "presence"
    for res in k["resources"]:
        assert (K8S / res).is_file(), res
    assert "hpa.yaml" in k["resources"]
    # CRDs and the monitoring stack's config stay out of the base
    assert not any("keda" in r or "monitoring" in r for r in k["resources"])


def test_keda_scaled_object() -> None:
    so = one("ScaledObject")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    assert spec["minReplicaCount"] == 2 and spec["maxReplicaCount"] == 50
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == "1"
    assert trigger["metadata"]["query"].startswith(f"max({METRIC}")
    assert trigger["metadata"]["serverAddress"].startswith("http")
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert set(behavior) == {"scaleUp", "scaleDown"}


def test_service_monitor_targets_the_admin_service() -> None:
    sm = one("ServiceMonitor")
    admin = one("Service", "presence-admin")
    labels = admin["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == admin["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


# -- cross-references ---------------------------------------------------------------------

def container() -> dict[str, Any]:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env() -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container()["env"]}


def test_probes_hit_the_admin_port() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"ws": 8765, "admin": 9090}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_the_pods_run_the_dockerfile_image() -> None:
    """Image name and tag, entrypoint, ports and user agree with the Dockerfile."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    c = container()
    assert c["image"] == f"presence-server:{version[1]}"
    (image,) = one("Kustomization")["images"]
    assert (image["name"], image["newTag"]) == ("presence-server", version[1])
    # no command/args: the image's ENTRYPOINT (presence serve) runs, set up by env
    assert "command" not in c and "args" not in c
    assert re.search(r'^ENTRYPOINT \["presence", "serve"\]$', dockerfile, re.M)
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert exposed is not None
    assert sorted(int(x) for x in exposed[1].split()) == sorted(
        p["containerPort"] for p in c["ports"])
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user is not None
    pod = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user[1]), int(user[2]))
    assert env()["PRESENCE_HOST"] == env()["PRESENCE_ADMIN_HOST"] == "0.0.0.0"


def test_drain_fits_in_the_grace_period() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env()["PRESENCE_DRAIN_TIMEOUT"])
    # The node's stop after the drain has a budget of its own, then the process exits.
    assert float(pre_stop[1]) + drain + STOP_BUDGET < pod["terminationGracePeriodSeconds"]


def test_environment_loads_as_settings() -> None:
    values = {k: v for k, v in env().items() if isinstance(v, str)}
    assert env()["PRESENCE_JWT_SECRET"] == {"secretKeyRef": {"name": "presence-jwt",
                                                             "key": "secret"}}
    assert "fieldRef" in env()["PRESENCE_NODE_ID"]
    values["PRESENCE_JWT_SECRET"] = "from-the-secret"
    values["PRESENCE_NODE_ID"] = "presence-gateway-abc12"
    s = load_settings(env=values)
    t = s.transport
    assert (t.port, t.admin_port, t.admin_host) == (8765, 9090, "0.0.0.0")
    assert s.backend.redis_cluster.count(":6379") == 3
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert (s.autoscale.min_replicas, s.autoscale.max_replicas) == (
        hpa["minReplicas"], hpa["maxReplicas"])


def _bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


def test_resources_fit_the_connection_target() -> None:
    res = container()["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == "2"
    limit = _bytes(res["limits"]["memory"])
    max_conns = int(env()["PRESENCE_MAX_CONNECTIONS"])
    # a full node at 18 KB per connection plus ~100 MB of process stays under memory_max
    assert max_conns * 18_000 + 100 * 2**20 < 0.85 * limit
    assert _bytes(res["requests"]["memory"]) <= limit


def test_selectors_match_the_pods() -> None:
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container()["ports"]}
    for svc in (one("Service", "presence"), one("Service", "presence-admin")):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def _metric_names() -> set[str]:
    names: set[str] = set()
    for m in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}[m.type]
        names.update(m.name + s for s in suffixes)
    return names


def test_hpa_follows_the_exported_gauge() -> None:
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert METRIC in _metric_names()
    assert hpa["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["external"]["metric"]["name"] == METRIC
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}


def test_adapter_and_scrape_configs() -> None:
    adapter = yaml.safe_load(one("ConfigMap", "prometheus-adapter-presence")["data"]
                             ["config.yaml"])
    (rule,) = adapter["externalRules"]
    assert rule["name"]["as"] == METRIC
    assert rule["metricsQuery"].startswith("max(")
    scrape = yaml.safe_load(one("ConfigMap", "prometheus-presence-scrape")["data"]
                            ["presence-scrape.yaml"])
    (job,) = scrape
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "presence-admin;admin"


def test_dashboard_uses_exported_metrics() -> None:
    """The Grafana dashboard parses and queries only metrics the gateway exports
    (plus the kubelet's container and kube-state-metrics' series)."""
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    known = _metric_names()
    used = set()
    for p in panels:
        for t in p.get("targets", []):
            used.update(re.findall(r"\bpresence_[a-z_]+", t["expr"]))
    assert used and used <= known, used - known
