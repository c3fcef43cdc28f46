"""The image, built from the Dockerfile and run with podman: ``nox -s container``.

Every container here is on loopback: ``--network host`` with the proxy on 127.0.0.1 and a port
chosen at run time, or podman's own bridge with its published port bound to 127.0.0.1. The
upstream is the end-to-end tests' unbound on 127.0.0.1, its CA mounted read-only.
"""

from __future__ import annotations

import random
import re
import shlex
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, Built

import dot_proxy
from dot_proxy.testing import realdns

CA_INSIDE = "/etc/dot-proxy/ca.pem"
MAX_ADDED_BYTES = 15_000_000
UID = "10053"


@contextmanager
def running(built: Built, *args: str) -> Iterator[str]:
    """``podman run -d ARGS``; yields the container's name; removes it afterwards."""
    name = f"dot-proxy-test-{random.randrange(1 << 32):08x}"
    # No systemd here to run the HEALTHCHECK's timer: the test runs it (podman healthcheck run).
    built.podman.run("run", "-d", "--name", name, "--health-interval", "disable", *args)
    try:
        yield name
    finally:
        built.podman.run("rm", "--force", "--time", "0", name, check=False)


def _status(built: Built, name: str) -> dict[str, str]:
    text = built.podman.run("exec", name, "cat", "/proc/1/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _logs(built: Built, name: str) -> str:
    result = built.podman.run("logs", name, check=False)
    return result.stdout + result.stderr


def _dig(port: int, *client: str, name: str = "h5.test") -> str:
    result = subprocess.run(
        # Options after the defaults win (kdig and dig alike).
        [client[0], "@127.0.0.1", "-p", str(port), name, "A", "+time=2", "+retry=1", *client[1:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return result.stdout


def _wait_answering(port: int, built: Built, name: str) -> None:
    for _ in range(30):
        state = built.podman.inspect(name)["State"]
        assert isinstance(state, dict)
        if not state["Running"]:
            pytest.fail(f"the container exited {state['ExitCode']}:\n{_logs(built, name)}")
        if "status:" in _dig(port, "kdig", "+time=1", name="h0.test"):
            return
    pytest.fail(f"no answer from the container; its log:\n{_logs(built, name)}")


def _stop_gracefully(built: Built, name: str) -> None:
    # STOPSIGNAL SIGTERM, and 2 s before podman would SIGKILL it (exit 137): status 0 means
    # it stopped by itself, gracefully, within those 2 s.
    built.podman.run("stop", "--time", "2", name)
    state = built.podman.inspect(name)["State"]
    assert isinstance(state, dict)
    assert state["ExitCode"] == 0, _logs(built, name)
    assert "stopped" in _logs(built, name)


def _privileged_free_port() -> int:
    """A port under 1024 free on 127.0.0.1 for UDP and TCP, chosen at run time."""
    for port in random.sample(range(600, 1024), 424):
        try:
            with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port under 1024")


def _documented_run(path: Path, marker: str) -> list[str]:
    """The ``docker run`` command in ``path`` that contains ``marker``, as argv."""
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip().startswith("docker run") and marker in line:
            return shlex.split(line)
    raise AssertionError(f"{path.name} shows no `docker run ... {marker}` line")


def test_the_image_is_small_unprivileged_and_labelled(built: Built) -> None:
    image = built.podman.inspect(built.tag)
    config = image["Config"]
    assert isinstance(config, dict)
    assert config["User"] == f"{UID}:{UID}"
    assert config["StopSignal"] == "SIGTERM"
    healthcheck = image["Healthcheck"]
    assert isinstance(healthcheck, dict)
    assert healthcheck["Test"] == ["CMD", "dot-proxy", "healthcheck"]
    labels = config["Labels"]
    assert isinstance(labels, dict)
    assert labels["org.opencontainers.image.version"] == dot_proxy.__version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert "org.opencontainers.image.source" in labels
    added = built.podman.size(built.tag) - built.podman.size(built.base)
    layers = built.podman.run(
        "history", "--format", "{{.Size}}\t{{.CreatedBy}}", built.tag
    ).stdout.splitlines()
    ours = [line for line in layers if not line.startswith("0 B")][:-1]  # the base's last
    built.report.append(f"dot-proxy adds {added / 1e6:.1f} MB over the base:")
    built.report.extend(f"  {line[:110]}" for line in ours)
    assert added < MAX_ADDED_BYTES


def test_no_pip_setuptools_or_compiler_in_the_final_image(built: Built) -> None:
    listing = built.podman.run(
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        built.tag,
        "-c",
        "ls /opt/venv/lib/python3*/site-packages /opt/venv/bin; command -v gcc cc pip pip3 || true",
    ).stdout
    assert "trio" in listing and "dot_proxy" in listing
    assert not re.search(r"^(pip|setuptools|gcc|cc)\b|/(gcc|cc|pip3?)$", listing, re.MULTILINE), (
        listing
    )


def test_on_the_host_network_it_answers_udp_and_tcp_as_nobody_read_only(
    built: Built, unbound: realdns.Unbound, pki: realdns.Pki
) -> None:
    port, metrics = realdns.free_port("both"), realdns.free_port("tcp")
    with running(
        built,
        "--network",
        "host",
        "--read-only",
        "--volume",
        f"{pki.ca_file}:{CA_INSIDE}:ro",
        "--env",
        "DOT_PROXY_LISTEN=127.0.0.1",
        "--env",
        f"DOT_PROXY_PORT={port}",
        "--env",
        f"DOT_PROXY_METRICS=0.0.0.0:{metrics}",
        "--env",
        f"DOT_PROXY_UPSTREAM={unbound.upstream_spec}",
        "--env",
        f"DOT_PROXY_CA_FILE={CA_INSIDE}",
        built.tag,
    ) as name:
        _wait_answering(port, built, name)
        for client in (["kdig"], ["kdig", "+tcp"], ["dig"], ["dig", "+tcp"]):
            out = _dig(port, *client)
            assert "NOERROR" in out and "198.18.0.5" in out, (client, out, _logs(built, name))
        status = _status(built, name)
        assert status["Uid"].split() == [UID] * 4
        assert int(status["CapEff"], 16) == 0
        touch = built.podman.run("exec", name, "touch", "/opt/venv/x", check=False)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
        assert built.podman.run("healthcheck", "run", name, check=False).returncode == 0
        # With the endpoint on, the health check asks its /healthz too (the wildcard on loopback).
        health = built.podman.run("exec", name, "dot-proxy", "healthcheck").stdout
        assert f"http 127.0.0.1:{metrics}/healthz: answered 200 ok" in health, health
        _stop_gracefully(built, name)


def _on_loopback(arg: str, port: int, tag: str) -> str:
    if arg.startswith("53:5300/"):
        return f"127.0.0.1:{port}:5300/{arg.rsplit('/', 1)[1]}"
    if arg.startswith("DOT_PROXY_UPSTREAM="):
        return "DOT_PROXY_UPSTREAM=127.0.0.1:9#nowhere.test"
    return tag if arg == "dot-proxy" else arg


def test_the_readme_line_works_as_written(built: Built) -> None:
    # The README's line, with its published ports bound to loopback at a port chosen now,
    # and an upstream on loopback that answers nothing: the proxy says SERVFAIL itself.
    argv = _documented_run(ROOT / "README.md", "5300")
    port = realdns.free_port("both")
    args = [_on_loopback(arg, port, built.tag) for arg in argv[2:]]
    assert args[0] == "-d" and args[1] == "--name"
    with running(built, *args[3:]) as name:
        _wait_answering(port, built, name)
        for client in (["kdig"], ["dig", "+tcp"]):
            out = _dig(port, *client)
            assert "status: SERVFAIL" in out, (client, out, _logs(built, name))
        assert _status(built, name)["Uid"].split() == [UID] * 4
        assert built.podman.run("healthcheck", "run", name, check=False).returncode == 0
        _stop_gracefully(built, name)


def test_the_host_network_line_of_docs_deploy_binds_53_and_drops_to_the_user(
    built: Built, unbound: realdns.Unbound, pki: realdns.Pki
) -> None:
    # docs/deploy.md's home-network line: started as root with only the capabilities to bind
    # and to switch user, it binds a port under 1024 and becomes dotproxy before serving.
    argv = _documented_run(ROOT / "docs" / "deploy.md", "--network host")
    port = _privileged_free_port()
    image = argv.index("dot-proxy", argv.index("--name") + 2)
    options, flags = argv[2:image], argv[image + 1 :]
    assert options[0] == "-d" and options[1] == "--name"
    flags = [str(port) if flag == "53" else flag for flag in flags]
    flags = ["127.0.0.0/8" if "/" in flag and flag[0].isdigit() else flag for flag in flags]
    with running(
        built,
        *options[3:],
        "--volume",
        f"{pki.ca_file}:{CA_INSIDE}:ro",
        built.tag,
        *flags,
        "--listen",
        "127.0.0.1",
        "--upstream",
        unbound.upstream_spec,
        "--ca-file",
        CA_INSIDE,
    ) as name:
        _wait_answering(port, built, name)
        for client in (["kdig"], ["dig", "+tcp"]):
            out = _dig(port, *client)
            assert "NOERROR" in out and "198.18.0.5" in out, (client, out, _logs(built, name))
        status = _status(built, name)
        assert status["Uid"].split() == [UID] * 4
        assert int(status["CapEff"], 16) == 0
        assert "running as user dotproxy" in _logs(built, name)
        _stop_gracefully(built, name)
