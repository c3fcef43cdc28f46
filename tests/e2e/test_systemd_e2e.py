"""The proxy started as systemd starts it, without systemd: passed sockets and sd_notify.

A socket unit binds the sockets and starts the service with them as descriptors 3, 4, ...,
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` set, and (``Type=notify``) ``NOTIFY_SOCKET``
naming a datagram socket it reads. ``ACTIVATE`` below is what systemd does between fork and
exec: move the descriptors into place and name its own pid, then exec the proxy.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from dot_proxy.config import Config, parse_upstream
from dot_proxy.serve.sockets import bind_sockets
from dot_proxy.testing import realdns

pytestmark = pytest.mark.e2e

# argv: the descriptors to pass, "--", the command. Runs in the child, as systemd's
# exec step does: descriptors to 3.. (via a range above them, so none is overwritten before
# it moved), LISTEN_PID = this process, which exec keeps.
ACTIVATE = """
import fcntl, os, sys
cut = sys.argv.index("--")
fds, argv = [int(a) for a in sys.argv[1:cut]], sys.argv[cut + 1:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(argv[0], argv)
"""
READY_TIMEOUT = 15.0
NOWHERE = "127.0.0.1:9#nowhere.test"  # only to build a Config for bind_sockets


@contextmanager
def _manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's end of NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(READY_TIMEOUT)
        yield manager


@contextmanager
def _running(
    argv: Sequence[str], env: dict[str, str], log: Path, pass_fds: Sequence[int] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=out, pass_fds=pass_fds)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _messages(manager: socket.socket, until: bytes, log: Path) -> list[bytes]:
    received: list[bytes] = []
    while not any(message.startswith(until) for message in received):
        try:
            received.append(manager.recv(4096))
        except TimeoutError:
            pytest.fail(f"no {until!r} after {received}; log:\n{log.read_text()}")
    return received


def _proxy(unbound: realdns.Unbound, pki: realdns.Pki, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dot_proxy",
        "--upstream",
        unbound.upstream_spec,
        "--ca-file",
        str(pki.ca_file),
        *args,
    ]


def test_socket_activation_serves_the_passed_sockets(
    unbound: realdns.Unbound,
    pki: realdns.Pki,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools("kdig", "dig")
    # What dot-proxy.socket binds, on loopback: UDP and TCP, IPv4 and IPv6, one port.
    config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1", "::1"), port=0)
    sockets = bind_sockets(config)
    port = sockets[0].getsockname()[1]
    fds = [sock.fileno() for sock in sockets]
    # --listen names an address this host does not have: binding it would fail, so an
    # answer shows that the passed sockets, and only they, are served.
    argv = [
        sys.executable,
        "-c",
        ACTIVATE,
        *map(str, fds),
        "--",
        *_proxy(unbound, pki, "--listen", "192.0.2.53", "--port", "53"),
    ]
    env = realdns.dot_proxy_environment(
        {"LISTEN_FDNAMES": ":".join(["dns"] * len(fds)), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    )
    log = tmp_path / "dot-proxy.log"
    with _manager(tmp_path) as manager, _running(argv, env, log, pass_fds=fds) as process:
        for sock in sockets:
            sock.close()  # the child holds them now, as systemd's socket unit would not
        _messages(manager, b"READY=1", log)
        for host in ("127.0.0.1", "::1"):
            for client in (["kdig"], ["dig", "+tcp"]):
                out = subprocess.run(
                    [*client, f"@{host}", "-p", str(port), "h7.test", "A", "+time=3"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=20,
                )
                assert "NOERROR" in out.stdout and "198.18.0.7" in out.stdout, (
                    client,
                    host,
                    out.stdout,
                    log.read_text(),
                )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    text = log.read_text()
    assert text.count("socket activation:") == len(fds), text
    assert "(dns)" in text
    assert "192.0.2.53" not in text


def test_notify_ready_once_serving_and_stopping_on_sigterm(
    unbound: realdns.Unbound, pki: realdns.Pki, tmp_path: Path
) -> None:
    port = realdns.free_port("both")
    argv = _proxy(unbound, pki, "--listen", "127.0.0.1", "--port", str(port))
    log = tmp_path / "dot-proxy.log"
    env = realdns.dot_proxy_environment({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    with _manager(tmp_path) as manager, _running(argv, env, log) as process:
        [ready] = _messages(manager, b"READY=1", log)
        assert ready.startswith(b"READY=1\nSTATUS=serving on "), ready
        assert f"udp 127.0.0.1:{port}".encode() in ready, ready
        # Ready means answering: one query, no retry, straight after the message.
        answer = realdns.udp_query(port, "h3.test.", timeout=5.0)
        assert answer.answer, answer
        process.send_signal(signal.SIGTERM)
        after = _messages(manager, b"STOPPING=1", log)
        assert after == [b"STOPPING=1\nSTATUS=stopping"]
        assert process.wait(timeout=10) == 0
        manager.settimeout(0.2)
        with pytest.raises(TimeoutError):
            manager.recv(4096)  # nothing more: READY=1 was sent once


def test_with_workers_the_supervisor_notifies_ready_and_stopping(
    unbound: realdns.Unbound, pki: realdns.Pki, tmp_path: Path
) -> None:
    # The workers do not notify (NotifyAccess=main); the supervisor does once the sockets
    # are bound and the workers forked: what arrives before they read waits in the sockets.
    # And when it passes SIGTERM on, the stop has begun: STOPPING=1, once.
    port = realdns.free_port("both")
    argv = _proxy(unbound, pki, "--listen", "127.0.0.1", "--port", str(port), "--workers", "2")
    log = tmp_path / "dot-proxy.log"
    env = realdns.dot_proxy_environment({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    with _manager(tmp_path) as manager, _running(argv, env, log) as process:
        [ready] = _messages(manager, b"READY=1", log)
        assert ready == b"READY=1\nSTATUS=2 workers serving"
        answer = realdns.udp_query(port, "h3.test.", timeout=5.0)
        assert answer.answer, answer
        process.send_signal(signal.SIGTERM)
        after = _messages(manager, b"STOPPING=1", log)
        assert after == [b"STOPPING=1\nSTATUS=stopping"]
        assert process.wait(timeout=10) == 0
        manager.settimeout(0.2)
        with pytest.raises(TimeoutError):
            manager.recv(4096)  # nothing more: not a second STOPPING=1, nothing from a worker
    assert log.read_text().count("stopped") >= 2, log.read_text()


UNITS = Path(__file__).resolve().parent.parent.parent / "deploy" / "systemd"
# systemd-analyze security's own scale: up to 2.0 is "OK", the best band it has.
MAX_EXPOSURE = 2.0


@pytest.fixture
def system_root(tmp_path: Path, require_tools: Callable[..., None]) -> Path:
    """A root with systemd's own units, ours installed and the programs they run present
    (ExecStart's and ExecReload's: verify checks that each is there and executable)."""
    require_tools("systemd-analyze")
    root = tmp_path / "root"
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for name in ("opt/dot-proxy/bin/dot-proxy", "bin/kill"):
        program = root / name
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for unit in ("dot-proxy.service", "dot-proxy.socket"):
        shutil.copy(UNITS / unit, installed / unit)
    return root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", f"--root={root}", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=root,
    )


@pytest.mark.parametrize("drop_in", [False, True], ids=["socket-activated", "no-socket.conf"])
def test_systemd_analyze_verify_finds_nothing(system_root: Path, drop_in: bool) -> None:
    installed = system_root / "etc/systemd/system"
    if drop_in:
        (installed / "dot-proxy.service.d").mkdir()
        shutil.copy(UNITS / "no-socket.conf", installed / "dot-proxy.service.d")
    units = [str(installed / "dot-proxy.socket"), str(installed / "dot-proxy.service")]
    result = _analyze(system_root, "verify", *units)
    # Unknown keys and bad values are warnings with status 0: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_security_rates_the_service_ok(system_root: Path) -> None:
    result = _analyze(system_root, "security", "--offline=yes", "dot-proxy.service")
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for dot-proxy.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
