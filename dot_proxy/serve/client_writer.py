"""Answers back to a client TCP connection: written at once, queued when the kernel is full."""

from __future__ import annotations

import socket

import trio

__all__ = ["SocketWriter"]


class SocketWriter:
    """Write DNS frames to a non-blocking stdlib socket: at once if the kernel takes them.

    A client connection's answers are written from the task that produced them, in one
    ``send`` call with no await, so they cannot interleave and cost no wake-up of another
    task. Only when the kernel's buffer is full does the rest queue for :meth:`run`, which
    waits for the socket to become writable; later writes queue behind it to keep order.

    Resource handling: :meth:`run` lives in the connection's nursery and returns after
    :meth:`close` once everything is sent; it raises ``trio.BrokenResourceError`` when the peer
    is gone. The owner closes the socket. The queue has no bound of its own: the owner stops
    producing while :attr:`backed_up` (see :meth:`wait_drained`).
    """

    __slots__ = ("_blocked", "_broken", "_closing", "_drained", "_lot", "_queue", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()  # where run() waits for something to send
        self._drained = trio.lowlevel.ParkingLot()
        self._blocked = False
        self._closing = False
        self._broken: OSError | None = None

    def close(self) -> None:
        """Let :meth:`run` return once everything queued so far is sent."""
        self._closing = True
        self._lot.unpark()

    def write_nowait(self, data: bytes) -> None:
        """Send ``data`` now if possible, else queue it behind what is already waiting."""
        if self._broken is not None:
            return
        if not self._queue and not self._blocked:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                # The peer is gone: run() wakes to raise it; later answers are dropped.
                self._broken = exc
                self._lot.unpark()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._queue.append(data)
        if len(self._queue) == 1:
            self._lot.unpark()

    @property
    def backed_up(self) -> bool:
        """Whether data waits for the peer to read: the kernel's buffer is full."""
        return self._blocked or bool(self._queue)

    async def wait_drained(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        while self.backed_up and self._broken is None:
            await self._drained.park()

    async def run(self) -> None:
        """Send whatever the kernel would not take at once, in order, until closed."""
        queue = self._queue
        while True:
            if self._broken is not None:
                raise trio.BrokenResourceError(str(self._broken)) from self._broken
            if not queue:
                self._drained.unpark_all()
                if self._closing:
                    return
                await self._lot.park()
                continue
            self._blocked = True
            data = b"".join(queue)
            queue.clear()
            while data:
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    sent = self._sock.send(data)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                data = data[sent:]
            self._blocked = False
