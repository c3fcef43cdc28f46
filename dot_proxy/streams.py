"""Stream helpers shared by the client side and the upstream side of the proxy."""

from __future__ import annotations

from collections.abc import Callable

import trio

__all__ = ["BatchWriter"]


class BatchWriter:
    """Serialise writes to one stream, coalescing whatever queued up meanwhile.

    Many tasks answer or query on one connection at once; a single writer task means their
    bytes never interleave, a task that is cancelled never leaves a write half done, and a burst
    of messages goes out in one ``send_all`` (one TLS record, one syscall) instead of one each.

    Resource handling: :meth:`run` lives in the nursery of whoever owns the stream. It returns
    when :meth:`close` has been called and the queue is empty, or raises what ``send_all``
    raised; either way the owner closes the stream.
    """

    __slots__ = ("_after_send", "_closing", "_lot", "_queue", "_stream")

    def __init__(
        self, stream: trio.abc.SendStream, *, after_send: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._queue: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._after_send = after_send

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet handed to the stream."""
        return sum(map(len, self._queue))

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data``; it is sent after everything queued before it."""
        self._queue.append(data)
        if len(self._queue) == 1:
            self._lot.unpark()

    def close(self) -> None:
        """Let :meth:`run` return once everything queued so far is sent."""
        self._closing = True
        self._lot.unpark()

    async def run(self) -> None:
        """Send queued data until closed."""
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                await self._lot.park()
                continue
            batch = queue[0] if len(queue) == 1 else b"".join(queue)
            queue.clear()
            await self._stream.send_all(batch)
            if self._after_send is not None:
                self._after_send()
