"""deploy/kubernetes: every manifest valid against the API schemas, and what it promises.

Offline: kubernetes-validate carries the schemas. The kustomize output (the generated
ConfigMap, the node-local overlay as applied) is rendered and checked in
tests/e2e/test_kustomize_e2e.py, where kubectl or kustomize is needed.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dot_proxy.cli import build_config
from dot_proxy.serve.server import SHUTDOWN_GRACE

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# The oldest release with the preStop sleep action on by default, and the newest the pinned
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

Doc = dict[str, Any]


def manifests() -> list[tuple[Path, Doc]]:
    """Every Kubernetes object in deploy/kubernetes (not the kustomizations: not API objects)."""
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def one(kind: str, name: str | None = None) -> Doc:
    matching = [
        doc
        for _, doc in manifests()
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]
    assert len(matching) == 1, (kind, name, len(matching))
    return matching[0]


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs if not key.startswith("#")}


def validate(doc: Doc) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


MANIFESTS = manifests()


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in MANIFESTS],
    ids=[f"{path.parent.name}/{doc['kind']}/{doc['metadata']['name']}" for path, doc in MANIFESTS],
)
def test_every_manifest_is_valid_against_the_api_schema(doc: Doc) -> None:
    validate(doc)


def test_the_validator_catches_a_misspelt_field() -> None:
    broken = yaml.safe_load((KUBERNETES / "base" / "service.yaml").read_text())
    broken["spec"]["port"] = broken["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def container_of(workload: Doc) -> Doc:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


WORKLOADS = [("Deployment", "dot-proxy"), ("DaemonSet", "dot-proxy-node-local")]


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_both_protocols_probes_and_resources(kind: str, name: str) -> None:
    container = container_of(one(kind, name))
    ports = {(port["protocol"], port["containerPort"]) for port in container["ports"]}
    assert {protocol for protocol, _ in ports} == {"UDP", "TCP"}
    assert len({number for _, number in ports}) == 1, "UDP and TCP on one port"
    assert container["livenessProbe"]["exec"]["command"] == ["dot-proxy", "healthcheck"]
    assert "tcpSocket" in container["readinessProbe"]
    for kind_of in ("requests", "limits"):
        assert set(container["resources"][kind_of]) == {"cpu", "memory"}
    # One process uses one core at most: a bigger limit would reserve nothing it can use.
    assert container["resources"]["limits"]["cpu"] == "1"


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_read_only_and_no_escalation(kind: str, name: str) -> None:
    workload = one(kind, name)
    assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    security = container_of(workload)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_the_deployment_runs_as_nobody_with_no_capability_spread_over_nodes() -> None:
    deployment = one("Deployment", "dot-proxy")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10053
    assert container_of(deployment)["securityContext"]["capabilities"].get("add") is None
    spread = {c["topologyKey"]: c["whenUnsatisfiable"] for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"] == "DoNotSchedule"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_a_stopping_replica_answers_until_kube_proxy_has_moved_on() -> None:
    deployment = one("Deployment", "dot-proxy")
    pre_stop = container_of(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop >= 5
    assert grace > pre_stop + SHUTDOWN_GRACE + 2  # the drain, and time to exit


def test_the_service_maps_53_to_the_container_over_udp_and_tcp() -> None:
    service = one("Service", "dot-proxy")
    named = {port["name"] for port in container_of(one("Deployment", "dot-proxy"))["ports"]}
    assert {(p["protocol"], p["port"]) for p in service["spec"]["ports"]} == {
        ("UDP", 53),
        ("TCP", 53),
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    selector = service["spec"]["selector"]
    labels = one("Deployment", "dot-proxy")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_the_disruption_budget_covers_the_replicas() -> None:
    budget = one("PodDisruptionBudget", "dot-proxy")
    labels = one("Deployment", "dot-proxy")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < one("Deployment", "dot-proxy")["spec"]["replicas"]


def test_the_settings_are_ones_the_proxy_accepts_and_match_the_ports() -> None:
    settings = env_file(KUBERNETES / "base" / "dot-proxy.env")
    config = build_config([], settings)
    ports = {
        port["containerPort"] for port in container_of(one("Deployment", "dot-proxy"))["ports"]
    }
    assert ports == {config.port}
    assert config.port >= 1024, "an unprivileged process binds no lower port"
    assert config.workers == 1, "scale with replicas: each one process"


def test_the_node_local_overlay_listens_on_a_link_local_address_on_53() -> None:
    kustomization = yaml.safe_load(
        (KUBERNETES / "overlays" / "node-local" / "kustomization.yaml").read_text()
    )
    [generator] = kustomization["configMapGenerator"]
    literals = dict(item.split("=", 1) for item in generator["literals"])
    assert ipaddress.ip_address(literals["DOT_PROXY_LISTEN"]).is_link_local
    daemonset = one("DaemonSet", "dot-proxy-node-local")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    container = container_of(daemonset)
    assert {port["containerPort"] for port in container["ports"]} == {
        int(literals["DOT_PROXY_PORT"])
    }
    assert container["readinessProbe"]["tcpSocket"]["host"] == literals["DOT_PROXY_LISTEN"]
    # Root only to bind 53 and switch user; --user drops to dotproxy before serving.
    assert container["args"] == ["--user", "dotproxy"]
    assert sorted(container["securityContext"]["capabilities"]["add"]) == [
        "NET_BIND_SERVICE",
        "SETGID",
        "SETUID",
    ]
    [init] = pod["initContainers"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert re.search(
        rf"\b{re.escape(literals['DOT_PROXY_LISTEN'])}/32\b", " ".join(init["command"])
    )
