"""Socket activation: serve the sockets systemd bound, the ``sd_listen_fds`` protocol.

systemd (a ``.socket`` unit) binds the listening sockets itself, as root, and starts the
service with them open as file descriptors 3, 4, ... and three environment variables:
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the process they are meant for: a child that
inherits the environment must not take them too) and ``LISTEN_FDNAMES`` (colon-separated
names, ``FileDescriptorName=``). The service then needs no privilege to serve port 53: it
runs as a ``DynamicUser`` with no capability at all. See sd_listen_fds(3).

``parse_listen_fds`` is pure (an environment and a pid in, descriptor numbers and names
out); ``take_listen_fds`` also clears the variables; ``adopt_sockets`` turns the descriptors
into sockets and checks that each is one the proxy can serve: UDP, or TCP already listening,
on IPv4 or IPv6.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from dot_proxy.config import host_port
from dot_proxy.errors import ConfigError
from dot_proxy.serve.sockets import grow_receive_buffer

__all__ = [
    "ACTIVATION_VARIABLES",
    "LISTEN_FDS_START",
    "ListenFd",
    "adopt_sockets",
    "parse_listen_fds",
    "take_listen_fds",
]

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first descriptor passed
ACTIVATION_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# More than any socket unit would pass; a larger count is a corrupt environment.
_MAX_FDS = 1024


@dataclass(frozen=True, slots=True)
class ListenFd:
    """One passed descriptor: its number and the name the socket unit gave it."""

    fd: int
    name: str


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> tuple[ListenFd, ...] | None:
    """The descriptors passed to process ``pid``, or ``None`` when none were passed to it.

    ``None`` when ``LISTEN_FDS`` is unset, or ``LISTEN_PID`` is set and names another
    process (the variables were inherited, the descriptors are not ours); sd_listen_fds(3)
    does the same. Names missing from ``LISTEN_FDNAMES`` are ``"unknown"``, as in systemd.

    Error handling: raises :class:`ConfigError` for a ``LISTEN_FDS`` or ``LISTEN_PID`` that
    is not a number, or a count out of range.
    """
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        return None
    pid_text = environ.get("LISTEN_PID")
    if pid_text is not None:
        if not pid_text.strip().isdigit():
            raise ConfigError(f"LISTEN_PID: {pid_text!r} is not a process id")
        if int(pid_text) != pid:
            return None
    if not count_text.strip().isdigit() or not 0 < int(count_text) <= _MAX_FDS:
        raise ConfigError(f"LISTEN_FDS: {count_text!r} is not a number of sockets (1-{_MAX_FDS})")
    count = int(count_text)
    text = environ.get("LISTEN_FDNAMES")
    names = text.split(":") if text else []
    names += ["unknown"] * (count - len(names))
    return tuple(ListenFd(LISTEN_FDS_START + index, names[index]) for index in range(count))


def take_listen_fds(environ: MutableMapping[str, str], pid: int) -> tuple[ListenFd, ...] | None:
    """:func:`parse_listen_fds`, then remove the variables from ``environ``.

    A process this one starts then does not try to take the same descriptors
    (sd_listen_fds(3), ``unset_environment``).
    """
    try:
        return parse_listen_fds(environ, pid)
    finally:
        for name in ACTIVATION_VARIABLES:
            environ.pop(name, None)


def adopt_sockets(passed: Sequence[ListenFd]) -> list[socket.socket]:
    """Sockets for the descriptors ``passed``, each checked to be one the proxy can serve.

    Error handling: raises :class:`ConfigError` naming the descriptor when one is not a
    socket the proxy can serve (not open, not IPv4/IPv6, not UDP or listening TCP).
    Resource handling: on error, every descriptor passed is closed.
    """
    sockets: list[socket.socket] = []
    try:
        for listen_fd in passed:
            sockets.append(_adopt(listen_fd))
    except BaseException:
        for sock in sockets:
            sock.close()
        for listen_fd in passed[len(sockets) + 1 :]:
            _close_quietly(listen_fd.fd)
        raise
    for listen_fd, sock in zip(passed, sockets, strict=True):
        kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
        log.info("socket activation: %s %s (%s)", kind, _where(sock), listen_fd.name)
    return sockets


def _adopt(listen_fd: ListenFd) -> socket.socket:
    what = f"LISTEN_FDS: descriptor {listen_fd.fd} ({listen_fd.name})"
    try:
        # With fileno, the family and type are read from the descriptor itself.
        sock = socket.socket(fileno=listen_fd.fd)
    except OSError as exc:
        _close_quietly(listen_fd.fd)  # a file passed by mistake is ours to close all the same
        raise ConfigError(f"{what} is not an open socket ({exc.strerror or exc})") from None
    try:
        _check_servable(sock, what)
        if sock.type == socket.SOCK_DGRAM:
            # The unit's ReceiveBuffer= may have set it already; otherwise ask as we do.
            grow_receive_buffer(sock)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_servable(sock: socket.socket, what: str) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError(f"{what} is not an IPv4 or IPv6 socket")
    if sock.type == socket.SOCK_STREAM:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"{what} is a TCP socket that is not listening")
    elif sock.type != socket.SOCK_DGRAM:
        raise ConfigError(f"{what} is neither UDP nor TCP")


def _where(sock: socket.socket) -> str:
    address, port = sock.getsockname()[:2]
    return host_port(address, port)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)
