"""Binding the listening sockets: UDP and TCP on each address, one port, per worker."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import socket
import sys

from dot_proxy.config import Config, host_port
from dot_proxy.errors import ConfigError

__all__ = ["UDP_RECEIVE_BUFFER", "bind_sockets", "bind_worker_sockets", "grow_receive_buffer"]

log = logging.getLogger(__name__)

TCP_BACKLOG = 1024
# The UDP receive buffer asked for. The kernel's default (208 KiB) holds ~270 small queries,
# and a client may send far more at once: one that had a thousand queries answered together
# (an upstream came back) sends its next thousand as fast. NSD asks for 1 MiB, unbound's
# so-rcvbuf is commonly set to 4-8 MiB; SO_RCVBUFFORCE gets it past net.core.rmem_max where we
# may (root), elsewhere the kernel grants up to rmem_max.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
# Linux, with CAP_NET_ADMIN. Python's socket module does not name it (3.11-3.13): the number
# is Linux's own, asm-generic/socket.h.
SO_RCVBUFFORCE: int | None = getattr(
    socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None
)


def bind_sockets(config: Config, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind a UDP and a TCP socket on each listen address, all on one port.

    With ``port`` 0 the kernel picks a port for the first socket and every other socket takes
    the same one, so a client can use UDP and TCP alike (tests read it back). ``reuse_port``
    sets SO_REUSEPORT, so that other processes' sockets may share the port.

    Error handling: raises :class:`ConfigError` with a one-line explanation (no privilege for
    a low port, address in use, address not on this host). Resource handling: on error, every
    socket opened so far is closed.
    """
    for _attempt in range(20):
        try:
            return _bind_all(config, reuse_port)
        except _PortTaken:
            continue
    raise ConfigError(f"{config.name_of('port')}: 0: could not find one free port for UDP and TCP")


def bind_worker_sockets(config: Config) -> list[list[socket.socket]]:
    """One set of sockets per worker (``--workers``), all on the same port.

    With several workers every socket has SO_REUSEPORT: the kernel spreads UDP clients (by
    address and port) and TCP connections across the workers' sockets. Error handling and
    resource handling as :func:`bind_sockets`.
    """
    if config.workers == 1:
        return [bind_sockets(config)]
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(
            f"{config.name_of('workers')}: this system has no SO_REUSEPORT; use 1 worker"
        )
    sets = [bind_sockets(config, reuse_port=True)]
    try:
        same_port = dataclasses.replace(config, port=sets[0][0].getsockname()[1])
        for _ in range(config.workers - 1):
            sets.append(bind_sockets(same_port, reuse_port=True))
    except BaseException:
        for sockets in sets:
            for sock in sockets:
                sock.close()
        raise
    return sets


class _PortTaken(Exception):
    pass


def _bind_all(config: Config, reuse_port: bool) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    port = config.port
    defaults = config.listen == Config.__dataclass_fields__["listen"].default
    try:
        for address in config.listen:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                try:
                    sock = _bind_one(address, port, kind, reuse_port)
                except OSError as exc:
                    if defaults and address == "::" and exc.errno in _NO_IPV6:
                        log.warning("IPv6 is not available here; listening on IPv4 only")
                        break
                    if config.port == 0 and sockets and exc.errno == errno.EADDRINUSE:
                        raise _PortTaken from exc
                    raise _bind_error(config, address, port, exc) from None
                sockets.append(sock)
                port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def _bind_one(address: str, port: int, kind: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            # Separate IPv4 and IPv6 sockets, so "0.0.0.0" and "::" can both be bound.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
        else:
            grow_receive_buffer(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def grow_receive_buffer(sock: socket.socket, size: int = UDP_RECEIVE_BUFFER) -> None:
    """Ask for a UDP receive buffer of ``size`` bytes, never shrinking a bigger one.

    A socket systemd bound may have been given more already (``ReceiveBuffer=``, as root):
    setting SO_RCVBUF again without privilege would cut it down to ``net.core.rmem_max``.
    """
    # The kernel reports twice what was asked (it counts its bookkeeping too).
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * size:
        return
    force = SO_RCVBUFFORCE
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            pass
        else:
            return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# Ports to suggest: unprivileged, and not 5353, which is mDNS's (avahi holds it on desktops).
EXAMPLE_PORTS = (5300, 8053)


def _bind_error(config: Config, address: str, port: int, exc: OSError) -> ConfigError:
    where = host_port(address, port)
    name = config.name_of("port")
    other = next(example for example in EXAMPLE_PORTS if example != port)
    # Said the way the port was given: a flag, a variable, a config file's key.
    if name.startswith("--"):
        example = f"{name} {other}"
    elif ":" in name:
        example = f"{name} = {other}"
    else:
        example = f"{name}={other}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"{name}: no permission to listen on {where}: ports below 1024 need root or "
            f"CAP_NET_BIND_SERVICE; choose another port, e.g. {example}"
        )
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{name}: {where} is already in use (another DNS server?); stop it or choose "
            f"another port, e.g. {example}"
        )
    return ConfigError(
        f"{config.name_of('listen')}: cannot listen on {where}: {exc.strerror or exc}"
    )
