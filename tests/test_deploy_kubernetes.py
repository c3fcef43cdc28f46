"""deploy/kubernetes: every manifest valid against the API schemas, and what it promises.

Offline: kubernetes-validate carries the schemas. The kustomize output (the generated
ConfigMap, the node-local overlay as applied) is rendered and checked in
tests/e2e/test_kustomize_e2e.py, where kubectl or kustomize is needed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dot_proxy.cli import build_config, check_config_file
from dot_proxy.config import Config
from dot_proxy.config_file import ConfigFile
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


def generated_files(where: Path = KUBERNETES / "base") -> dict[str, str]:
    """The ConfigMap the kustomization in ``where`` generates: file name → text."""
    kustomization = yaml.safe_load((where / "kustomization.yaml").read_text())
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == "dot-proxy"
    return {name: (where / name).read_text() for name in generator["files"]}


def container_env(container: Doc) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def config_path(workload: Doc) -> tuple[str, str, str]:
    """Where the pod reads its config file: (DOT_PROXY_CONFIG, the ConfigMap, the file's key),
    checked against the pod's volumes: a ConfigMap mounted read-only, holding that file."""
    container = container_of(workload)
    path = container_env(container)["DOT_PROXY_CONFIG"]
    volumes = {volume["name"]: volume for volume in workload["spec"]["template"]["spec"]["volumes"]}
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    key = path.removeprefix(mount["mountPath"] + "/")
    config_map = volumes[mount["name"]]["configMap"]["name"]
    return path, config_map, key


def pod_config(workload: Doc, data: Mapping[str, str], scratch: Path) -> Config:
    """The Config the workload's proxy starts with: its args and env, and the config file
    from ``data`` (the ConfigMap's) put where DOT_PROXY_CONFIG names it (here: in scratch)."""
    container = container_of(workload)
    _, _, key = config_path(workload)
    (scratch / key).write_text(data[key])
    env = {**container_env(container), "DOT_PROXY_CONFIG": str(scratch / key)}
    return build_config(container.get("args", []), env)


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
    dns = [port for port in container["ports"] if port["name"] != "metrics"]
    ports = {(port["protocol"], port["containerPort"]) for port in dns}
    assert {protocol for protocol, _ in ports} == {"UDP", "TCP"}
    assert len({number for _, number in ports}) == 1, "UDP and TCP on one port"
    [metrics] = [port for port in container["ports"] if port["name"] == "metrics"]
    assert metrics["protocol"] == "TCP"
    # Alive: the serve loops run; ready: and an upstream is usable (issue 15's probes).
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]
    for kind_of in ("requests", "limits"):
        assert set(container["resources"][kind_of]) == {"cpu", "memory"}
    # One process uses one core at most: a bigger limit would reserve nothing it can use.
    assert container["resources"]["limits"]["cpu"] == "1"


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_the_endpoint_is_on_where_the_probes_and_the_metrics_service_look(
    kind: str, name: str, tmp_path: Path
) -> None:
    workload = one(kind, name)
    container = container_of(workload)
    config = pod_config(workload, generated_files(), tmp_path)
    [metrics] = [port for port in container["ports"] if port["name"] == "metrics"]
    assert config.metrics is not None
    host, port = config.metrics
    # The kubelet probes the pod's IP, and Prometheus scrapes it: a wildcard address.
    assert (host, port) == ("0.0.0.0", metrics["containerPort"])
    service = one("Service", "dot-proxy-metrics")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # A replica with no upstream is unready: that is when its metrics are wanted most.
    assert service["spec"]["publishNotReadyAddresses"] is True


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_the_settings_are_a_config_file_from_the_generated_config_map(
    kind: str, name: str, tmp_path: Path
) -> None:
    workload = one(kind, name)
    path, config_map, key = config_path(workload)
    files = generated_files()
    assert config_map == "dot-proxy" and key in files
    (tmp_path / key).write_text(files[key])
    check_config_file(str(tmp_path / key))
    # No setting both in the file and in the pod's environment: the variable would win, and
    # an edit of the file would silently change nothing.
    in_file = set(ConfigFile.load(str(tmp_path / key)).values)
    in_env = {
        variable.removeprefix("DOT_PROXY_").lower().replace("_", "-")
        for variable in container_env(container_of(workload))
    }
    assert not in_file & in_env, in_file & in_env
    assert pod_config(workload, files, tmp_path).config_file == str(tmp_path / key)
    assert path == "/etc/dot-proxy/" + key


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


def test_the_settings_are_ones_the_proxy_accepts_and_match_the_ports(tmp_path: Path) -> None:
    deployment = one("Deployment", "dot-proxy")
    config = pod_config(deployment, generated_files(), tmp_path)
    ports = {
        port["containerPort"]
        for port in container_of(deployment)["ports"]
        if port["name"] != "metrics"
    }
    assert ports == {config.port}
    assert config.port >= 1024, "an unprivileged process binds no lower port"
    assert config.workers == 1, "scale with replicas: each one process"


def test_the_node_local_overlay_listens_on_a_link_local_address_on_53(tmp_path: Path) -> None:
    daemonset = one("DaemonSet", "dot-proxy-node-local")
    config = pod_config(daemonset, generated_files(), tmp_path)
    [listen] = config.listen
    assert ipaddress.ip_address(listen).is_link_local
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    container = container_of(daemonset)
    # On the host's network a container port is the node's port: each is declared as such.
    assert all(port["hostPort"] == port["containerPort"] for port in container["ports"])
    assert {port["containerPort"] for port in container["ports"] if port["name"] != "metrics"} == {
        config.port
    }
    assert config.port == 53
    assert config.upstreams, "the base's upstreams are kept"
    # Root only to bind 53 and switch user; --user drops to dotproxy before serving.
    assert container["args"] == ["--user", "dotproxy"]
    assert config.user == "dotproxy"
    assert sorted(container["securityContext"]["capabilities"]["add"]) == [
        "NET_BIND_SERVICE",
        "SETGID",
        "SETUID",
    ]
    [init] = pod["initContainers"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert re.search(rf"\b{re.escape(listen)}/32\b", " ".join(init["command"]))


def test_every_config_file_in_docs_deploy_is_one_the_proxy_accepts(tmp_path: Path) -> None:
    # The overlay's file (a heredoc) and the split-DNS example (a toml block), as pasted.
    text = (KUBERNETES.parent.parent / "docs" / "deploy.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", text, re.S)
    examples += re.findall(r"cat > dns-overlay/[\w-]+\.toml <<'EOF'\n(.*?\n)EOF\n", text, re.S)
    assert len(examples) >= 2
    for index, example in enumerate(examples):
        path = tmp_path / f"{index}.toml"
        path.write_text(example)
        config = check_config_file(str(path))
        assert config.upstreams
    split = check_config_file(str(tmp_path / "0.toml"))
    assert {zone.name for zone in split.forward} >= {"cluster.local."}
    assert all(zone.cleartext for zone in split.forward), "kube-dns speaks plain DNS"
