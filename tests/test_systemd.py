"""systemd's side of the house, in process: LISTEN_FDS parsing, adopting sockets, sd_notify.

The proxy started the way systemd starts it (descriptors 3.., LISTEN_PID, NOTIFY_SOCKET) is in
tests/e2e/test_systemd_e2e.py; the unit files themselves in tests/test_deploy_systemd.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dot_proxy.cli import main
from dot_proxy.errors import ConfigError
from dot_proxy.serve.activation import (
    ListenFd,
    adopt_sockets,
    parse_listen_fds,
    take_listen_fds,
)
from dot_proxy.serve.notify import Notifier, notify_address
from dot_proxy.serve.sockets import SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER

PID = 4242


def test_no_listen_fds_means_no_activation() -> None:
    assert parse_listen_fds({}, PID) is None
    assert parse_listen_fds({"LISTEN_PID": str(PID)}, PID) is None


def test_descriptors_start_at_three_with_their_names() -> None:
    environ = {"LISTEN_FDS": "4", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "dns:dns:dns:dns"}
    assert parse_listen_fds(environ, PID) == tuple(ListenFd(fd, "dns") for fd in (3, 4, 5, 6))


def test_missing_names_are_unknown_as_in_systemd() -> None:
    passed = parse_listen_fds({"LISTEN_FDS": "3", "LISTEN_FDNAMES": "udp"}, PID)
    assert passed == (ListenFd(3, "udp"), ListenFd(4, "unknown"), ListenFd(5, "unknown"))


def test_descriptors_meant_for_another_process_are_not_taken() -> None:
    # A child that inherited the variables (LISTEN_PID names its parent) leaves them alone.
    assert parse_listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": str(PID + 1)}, PID) is None


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "0"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "100000"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "self"}, "LISTEN_PID"),
    ],
)
def test_a_corrupt_environment_is_one_clear_error(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{named}: "):
        parse_listen_fds(environ, PID)


def test_the_variables_are_removed_once_read() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": str(PID + 1), "LISTEN_FDNAMES": "x", "HOME": "/"}
    assert take_listen_fds(environ, PID) is None
    assert environ == {"HOME": "/"}


def _passed(*socks: socket.socket) -> list[ListenFd]:
    # Handed over as bare descriptors, as systemd hands them.
    return [ListenFd(sock.detach(), f"s{index}") for index, sock in enumerate(socks)]


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_udp_and_listening_tcp_sockets_are_adopted() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.bind(("::1", 0))
    tcp.listen()
    where = (udp.getsockname(), tcp.getsockname())
    adopted = adopt_sockets(_passed(udp, tcp))
    try:
        assert [(s.family, s.type) for s in adopted] == [
            (socket.AF_INET, socket.SOCK_DGRAM),
            (socket.AF_INET6, socket.SOCK_STREAM),
        ]
        assert (adopted[0].getsockname(), adopted[1].getsockname()) == where
        assert not any(sock.get_inheritable() for sock in adopted)
        # Grown as the proxy's own are (the kernel caps it at rmem_max without privilege).
        default = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with default:
            assert adopted[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= min(
                2 * UDP_RECEIVE_BUFFER, default.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            )
    finally:
        for sock in adopted:
            sock.close()


def test_a_bigger_receive_buffer_from_the_unit_is_kept() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    force = SO_RCVBUFFORCE
    if force is None or os.geteuid() != 0:
        udp.close()
        pytest.skip("needs root (SO_RCVBUFFORCE), as systemd has")
    udp.setsockopt(socket.SOL_SOCKET, force, 4 * UDP_RECEIVE_BUFFER)
    given = udp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    [adopted] = adopt_sockets(_passed(udp))
    with adopted:
        assert adopted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == given


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "not listening"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), "not an IPv4 or IPv6"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 255), "neither UDP nor TCP"),
    ],
    ids=["tcp-not-listening", "unix", "raw"],
)
def test_a_socket_the_proxy_cannot_serve_is_refused_and_all_are_closed(
    make: object, complaint: str
) -> None:
    good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    good.bind(("127.0.0.1", 0))
    try:
        bad = make()  # type: ignore[operator]
    except PermissionError:
        good.close()
        pytest.skip("raw sockets need CAP_NET_RAW")
    after = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    passed = _passed(good, bad, after)
    with pytest.raises(ConfigError, match=f"descriptor {passed[1].fd} \\(s1\\) .*{complaint}"):
        adopt_sockets(passed)
    assert not any(_open(listen_fd.fd) for listen_fd in passed)


def test_a_descriptor_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    with pytest.raises(ConfigError, match="is not an open socket"):
        adopt_sockets([ListenFd(fd, "file")])
    assert not _open(fd)


# --- sd_notify ---------------------------------------------------------------------------------


def test_notify_socket_addresses() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@sd-notify/1"}) == b"\0sd-notify/1"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_notifier_sends_one_datagram_per_state(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert notifier.enabled
        notifier.ready("serving on udp 127.0.0.1 53")
        notifier.stopping()
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving on udp 127.0.0.1 53"
        assert manager.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"dot-proxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(b"\0" + name.encode())
        Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert manager.recv(4096) == b"READY=1"


def test_a_notifier_without_a_manager_is_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Notifier.from_environ({}).ready("x")  # nothing to send to, nothing said
    assert not caplog.records
    Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")}).stopping()
    assert "could not notify the service manager" in caplog.text


def test_workers_refuse_passed_sockets_before_touching_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    descriptor_3_open = _open(3)
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    with pytest.raises(SystemExit) as exit_info:
        main(["--workers", "2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("dot-proxy: --workers: the sockets systemd passes")
    # This process's descriptor 3 (whatever it is, not a passed socket) was left alone.
    assert _open(3) == descriptor_3_open
