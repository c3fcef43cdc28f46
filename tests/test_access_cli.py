"""Access and limit settings on the command line, and the privilege drop: ``python -m
dot_proxy`` as a subprocess, on real time. The policy itself is tested pure in
tests/test_access.py, and through the in-process proxy in tests/test_access_proxy.py.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from tests.clients import query
from tests.processes import Proxy, run_dot_proxy

# Bounds the wait for an answer from the subprocess proxy (well past its 5 s deadline).
ANSWER_GUARD = 15.0


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_dot_proxy("--listen", "127.0.0.1", "--port", "0", *args)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allow", "bogus"], "--allow"),
        (["--allow", "10.0.0.0/33"], "--allow"),
        (["--allow", "10.0.0.0/8", "--allow", "::/0/1"], "--allow"),
        (["--ratelimit", "-1"], "--ratelimit"),
        (["--ratelimit", "nan"], "--ratelimit"),
        (["--ratelimit", "inf"], "--ratelimit"),
        (["--ratelimit", "fast"], "--ratelimit"),
        (["--max-tcp-clients", "0"], "--max-tcp-clients"),
        (["--max-in-flight", "0"], "--max-in-flight"),
        (["--tcp-idle-timeout", "0"], "--tcp-idle-timeout"),
        (["--user", "nosuchuser-dot-proxy"], "--user"),
    ],
)
def test_a_bad_access_or_limit_setting_exits_2_with_one_line(args: list[str], needle: str) -> None:
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert needle in line
    assert result.stdout == ""


@pytest.fixture
def refusing_upstream() -> Iterator[str]:
    """An upstream spec for a loopback port bound but not listening: connect is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}#dns.test"


def _status(pid: int) -> dict[str, list[int]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(part) for part in value.split()]
    return fields


def _udp_ask(port: int, request: dns.message.Message) -> dns.message.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(ANSWER_GUARD)
        client.sendto(request.to_wire(), ("127.0.0.1", port))
        return dns.message.from_wire(client.recv(65535))


def _tcp_ask(port: int, request: dns.message.Message) -> dns.message.Message:
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_GUARD) as client:
        wire = request.to_wire()
        client.sendall(len(wire).to_bytes(2, "big") + wire)
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = client.recv(65535)
            assert chunk, "closed before the answer"
            data += chunk
        return dns.message.from_wire(data[2:])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user")
def test_as_root_with_user_it_binds_then_serves_as_that_user(refusing_upstream: str) -> None:
    nobody = pwd.getpwnam("nobody")
    listen = ("--listen", "127.0.0.1", "--port", "0")
    proxy = Proxy(*listen, "--upstream", refusing_upstream, "--user", "nobody")
    try:
        port = proxy.wait_for_port()
        status = _status(proxy.process.pid)
        assert status["Uid"] == [nobody.pw_uid] * 4  # real, effective, saved, filesystem
        assert status["Gid"] == [nobody.pw_gid] * 4
        assert status["Groups"] == []  # root's supplementary groups are gone too
        # It serves, as that user: the upstream refuses, so each query gets SERVFAIL at once.
        for ask in (_udp_ask, _tcp_ask, _udp_ask):
            request = query("as-nobody.example.", "A")
            answer = ask(port, request)
            assert answer.id == request.id
            assert answer.rcode() == dns.rcode.SERVFAIL
        assert proxy.process.poll() is None, "".join(proxy.stderr)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.finish() == 0
    finally:
        proxy.kill()
    seen = proxy.stderr
    assert any("running as user nobody" in line for line in seen), "".join(seen)
    assert not any("Traceback" in line for line in seen), "".join(seen)
