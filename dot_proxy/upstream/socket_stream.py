"""A trio stream over a bare non-blocking socket, under the upstream's ``trio.SSLStream``."""

from __future__ import annotations

import socket
from contextlib import suppress

import trio

__all__ = ["EagerSocketStream"]


class EagerSocketStream(trio.abc.HalfCloseableStream):
    """A trio stream over a connected, non-blocking stdlib socket: try first, wait if need be.

    The upstream's ``trio.SSLStream`` runs over this instead of ``trio.SocketStream``, which yields
    to the scheduler after every successful send and receive and wraps each call in several more
    layers: two scheduling rounds of latency per query, and CPU (docs/performance.md). Here a call
    that the kernel can take at once costs one syscall and no round; only a would-block waits on
    the socket. ``SSLStream`` still yields around every transport call (its internal locks do), and
    a receive yields every ``_YIELD_EVERY`` reads besides, so a reader fed without pause cannot
    starve other tasks.

    Unlike ``trio.SocketStream`` there is no guard against two tasks sending (or receiving) at
    once: its only user is one SSLStream, which serialises both directions itself.

    Error handling: OS errors become ``trio.BrokenResourceError`` (cause kept); use after
    :meth:`aclose` raises ``trio.ClosedResourceError``, in a task blocked on the socket too.
    Resource handling: the stream owns the socket and closes it in :meth:`aclose`.
    """

    _YIELD_EVERY = 16

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._reads = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        with memoryview(data) as view:
            remaining = view
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the stream is closed")
                try:
                    sent = sock.send(remaining)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                if sent == len(remaining):
                    return
                remaining = remaining[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.socket
        size = 65536 if max_bytes is None else max_bytes
        if size < 1:
            # b"" means end of stream: a zero-byte read must not look like one.
            raise ValueError("max_bytes must be >= 1")
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            try:
                data = sock.recv(size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            self._reads += 1
            if self._reads % self._YIELD_EVERY == 0:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        with suppress(OSError):  # already reset: there is nothing left to end
            self.socket.shutdown(socket.SHUT_WR)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wakes any task waiting on the socket with ClosedResourceError before the fd goes.
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
