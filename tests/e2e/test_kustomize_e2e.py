"""deploy/kubernetes as kustomize renders it: every object valid, the overlay as promised."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_kubernetes import KUBERNETES, config_path, pod_config, validate

pytestmark = pytest.mark.e2e

Doc = dict[str, Any]


@pytest.fixture
def render(require_tools: Callable[..., None]) -> Callable[[str], list[Doc]]:
    """``render("base")``: the objects kustomize makes of deploy/kubernetes/base."""
    kustomize = shutil.which("kustomize")
    command = [kustomize, "build"] if kustomize else ["kubectl", "kustomize"]
    if not kustomize:
        require_tools("kubectl")

    def run(where: str) -> list[Doc]:
        out = subprocess.run(
            [*command, str(KUBERNETES / where)],  # an absolute path stays as it is
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return run


def _by_kind(docs: list[Doc]) -> dict[str, list[Doc]]:
    kinds: dict[str, list[Doc]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def _pod_config_map(workload: Doc) -> str:
    return config_path(workload)[1]


@pytest.mark.parametrize("where", ["base", "overlays/node-local"])
def test_every_rendered_object_is_valid(render: Callable[[str], list[Doc]], where: str) -> None:
    docs = render(where)
    assert docs
    for doc in docs:
        validate(doc)


def test_the_base_is_a_deployment_with_its_generated_settings(
    render: Callable[[str], list[Doc]], tmp_path: Path
) -> None:
    kinds = _by_kind(render("base"))
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    [config_map] = kinds["ConfigMap"]
    [deployment] = kinds["Deployment"]
    # The generated name (a hash of the file) is the one the pods mount: an edit rolls them.
    assert _pod_config_map(deployment) == config_map["metadata"]["name"] != "dot-proxy"
    config = pod_config(deployment, config_map["data"], tmp_path)
    assert (config.port, config.metrics) == (5300, ("0.0.0.0", 9153))
    assert {s["metadata"]["name"] for s in kinds["Service"]} == {"dot-proxy", "dot-proxy-metrics"}


def test_the_node_local_overlay_is_a_daemonset_alone_on_its_node(
    render: Callable[[str], list[Doc]], tmp_path: Path
) -> None:
    kinds = _by_kind(render("overlays/node-local"))
    assert sorted(kinds) == ["ConfigMap", "DaemonSet", "Service"]
    assert [s["metadata"]["name"] for s in kinds["Service"]] == ["dot-proxy-metrics"]
    [config_map] = kinds["ConfigMap"]
    [daemonset] = kinds["DaemonSet"]
    assert _pod_config_map(daemonset) == config_map["metadata"]["name"]
    config = pod_config(daemonset, config_map["data"], tmp_path)
    assert (config.listen, config.port) == (("169.254.20.11",), 53)
    assert config.upstreams, "the base's upstreams are kept"


def test_the_overlay_in_docs_deploy_renders_as_described(
    render: Callable[[str], list[Doc]], tmp_path: Path
) -> None:
    # docs/deploy.md's own overlay, its files written and rendered as a reader would.
    text = (KUBERNETES.parent.parent / "docs" / "deploy.md").read_text()
    files = dict(re.findall(r"cat > dns-overlay/([\w.-]+) <<'EOF'\n(.*?\n)EOF\n", text, re.S))
    assert "kustomization.yaml" in files, "docs/deploy.md shows no overlay"
    overlay = tmp_path / "dns-overlay"
    shutil.copytree(KUBERNETES, overlay / "upstream")
    for name, content in files.items():
        (overlay / name).write_text(content)
    kinds = _by_kind(render(str(overlay)))
    [deployment] = kinds["Deployment"]
    [config_map] = kinds["ConfigMap"]
    for doc in (doc for docs in kinds.values() for doc in docs):
        validate(doc)
        assert doc["metadata"]["namespace"] == "dns"
    assert deployment["spec"]["replicas"] == 3
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/dot-proxy:0.1.0"
    assert _pod_config_map(deployment) == config_map["metadata"]["name"]
    config = pod_config(deployment, config_map["data"], tmp_path)
    assert config.allow == ("10.244.0.0/16",)
    assert [spec.auth_name for spec in config.upstreams] == ["dns.quad9.net", "dns.quad9.net"]
