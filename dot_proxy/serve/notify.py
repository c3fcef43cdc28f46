"""Telling the service manager how the proxy is doing: the ``sd_notify`` protocol.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET``, the path of a Unix datagram
socket (``@`` at the start: one in the abstract namespace), and waits for ``READY=1`` before it
counts the service as started: units ordered after it start only once the proxy answers
queries, and a proxy that fails before that fails its start. ``STOPPING=1`` says the stop has
begun. Each message is one datagram of ``KEY=VALUE`` lines (sd_notify(3)); this is those few
lines of it, with no dependency on libsystemd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "notify_address"]

log = logging.getLogger(__name__)


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address ``NOTIFY_SOCKET`` names, as ``socket.sendto`` takes it, or ``None``.

    A leading ``@`` names a socket in Linux's abstract namespace (a NUL byte on the wire).
    Only Unix sockets are read: ``vsock:`` addresses (virtual machines) are left alone.
    """
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return b"\0" + os.fsencode(path[1:])
    if path.startswith("/"):
        return path
    return None


class Notifier:
    """Sends state changes to the service manager; does nothing when there is none.

    Error handling: a message that cannot be sent is logged and otherwise ignored: the
    proxy serves whether or not systemd hears of it (the unit's start timeout reports it).
    """

    def __init__(self, address: str | bytes | None) -> None:
        self._address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """A notifier for the ``NOTIFY_SOCKET`` in ``environ`` (none: a silent one)."""
        return cls(notify_address(environ))

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self._address is not None

    def ready(self, status: str) -> None:
        """The proxy is serving: ``READY=1``, with a one-line ``STATUS=`` for systemctl."""
        self.send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        """The proxy has begun to stop."""
        self.send("STOPPING=1\nSTATUS=stopping")

    def send(self, message: str) -> None:
        """Send one datagram of ``KEY=VALUE`` lines."""
        if self._address is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.closing(sock):
            sock.setblocking(False)  # never hold up the event loop: drop the news instead
            try:
                sock.sendto(message.encode(), self._address)
            except OSError as exc:
                log.warning("could not notify the service manager: %s", exc)
