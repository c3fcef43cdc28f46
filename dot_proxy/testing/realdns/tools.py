"""What every real-DNS helper shares: its errors, the loopback address and the name the
certificates carry, finding the programs (Debian puts daemons off PATH), and free or closed
ports on loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Literal

AUTH_NAME = "dns.test"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 10.0


class RealDnsError(Exception):
    """A real DNS program could not be started, configured or run."""


class ToolMissingError(RealDnsError):
    """A program this helper needs is not installed (see ``missing_tools``)."""


# Debian installs daemons (unbound, dnsdist) in /usr/sbin, which is not on an unprivileged
# user's PATH: look there too, after PATH.
SYSTEM_TOOL_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """The path of program ``name`` on PATH or in ``SYSTEM_TOOL_DIRS``, or ``None``."""
    search = [os.environ.get("PATH", os.defpath), *SYSTEM_TOOL_DIRS]
    return shutil.which(name, path=os.pathsep.join(search))


def missing_tools(*names: str) -> list[str]:
    """Return those of ``names`` that ``find_tool`` cannot find (e.g. ``"unbound"``)."""
    return [name for name in names if find_tool(name) is None]


def _require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise ToolMissingError(f"{name} is not installed (Debian package: {name})")
    return path


# --- ports -------------------------------------------------------------------------------------

PortKind = Literal["tcp", "udp", "both"]


def free_port(kind: PortKind = "both", host: str = LOOPBACK) -> int:
    """Return a port on ``host`` that is free right now for TCP, UDP or both.

    Resource handling: the probe sockets are closed before returning, so another process may
    take the port before the caller binds it; the server classes retry with a new port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    first_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    for _ in range(100):
        with socket.socket(family, first_type) as first:
            first.bind((host, 0))
            port: int = first.getsockname()[1]
            if kind != "both":
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as second:
                try:
                    second.bind((host, port))
                except OSError:
                    continue  # taken for UDP: try another
                return port
    raise RealDnsError(f"no port free for {kind} on {host}")


def bound_pair(host: str = LOOPBACK) -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to one port on ``host`` (the kernel's pick for UDP,
    another tried when some other process holds it for TCP), and that port.

    Resource handling: the caller owns both sockets and closes them; held, the port stays
    theirs (unlike one :func:`free_port` found free).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            tcp.bind((host, port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp, port
    raise RealDnsError(f"no port free for both UDP and TCP on {host}")


@contextlib.contextmanager
def closed_port(host: str = LOOPBACK) -> Iterator[int]:
    """A TCP port on ``host`` that refuses connections for as long as the block runs.

    The port is bound and never listened on: a connection to it is refused, and no other
    process can take it meanwhile (nor can a connection use it as its own source port and
    connect to itself), as it could a port that :func:`free_port` merely found free.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]
