"""Stream helpers shared by the client side and the upstream side of the proxy."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Protocol

import trio

__all__ = ["BatchWriter", "EagerSend", "EagerSocketStream", "SocketWriter"]


class _QueuedWriter:
    """The part both writers share: a queue, a task parked until it fills, close(), and a
    failure seen outside ``run`` that ``run`` then raises."""

    __slots__ = ("_broken", "_closing", "_lot", "_queue")

    def __init__(self) -> None:
        self._queue: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._broken: BaseException | None = None

    def _fail(self, exc: BaseException) -> None:
        # A write from the caller's task failed: the writer task wakes to raise it.
        if self._broken is None:
            self._broken = exc
        self._lot.unpark()

    def _enqueue(self, data: bytes) -> None:
        self._queue.append(data)
        if len(self._queue) == 1:
            self._lot.unpark()

    def close(self) -> None:
        """Let ``run`` return once everything queued so far is sent."""
        self._closing = True
        self._lot.unpark()


class EagerSend(Protocol):
    """Sending without a scheduling round when the socket takes it (see tls.EagerSender)."""

    def send_nowait(self, data: bytes) -> memoryview | None: ...

    async def finish(self, rest: memoryview) -> None: ...

    async def send_all(self, data: bytes) -> None: ...


class BatchWriter(_QueuedWriter):
    """Serialise writes to one stream, coalescing whatever queued up meanwhile.

    Many tasks answer or query on one connection at once; a single writer task means their
    bytes never interleave, a task that is cancelled never leaves a write half done, and a burst
    of messages goes out in one ``send_all`` (one TLS record, one syscall) instead of one each.

    At low load there is nothing to coalesce, and the writer's wake-up and the stream's send
    lock cost a scheduling round each per message. With an ``eager`` sender, a message that
    comes alone skips them: the writer sends it without the lock's round, and while the writer
    found each message alone at its wake-up (it is :attr:`quiet`), the message's own task
    sends it in :meth:`send_alone` without waking the writer at all. Under load neither
    happens: the rounds are what lets a burst gather into one record.

    Resource handling: :meth:`run` lives in the nursery of whoever owns the stream. It returns
    when :meth:`close` has been called and the queue is empty, or raises what sending raised;
    either way the owner closes the stream.
    """

    __slots__ = (
        "_after_send",
        "_alone",
        "_busy",
        "_eager",
        "_send_all",
        "messages",
        "sends",
    )

    def __init__(
        self,
        send_all: Callable[[bytes], Awaitable[None]],
        *,
        after_send: Callable[[], None] | None = None,
        busy: Callable[[int], bool] | None = None,
        eager: EagerSend | None = None,
    ) -> None:
        super().__init__()
        self._send_all = send_all  # a stream's send_all (or one that behaves alike)
        self._after_send = after_send
        # busy(queued) says whether more messages are likely to be queued in a moment (the
        # owner has other work in flight): then one scheduling round is worth waiting.
        self._busy = busy
        self._eager = eager
        self._alone = False  # whether the last wake-up found one message and no load
        self.messages = 0  # written so far
        self.sends = 0  # sends so far; messages / sends is the batching gained

    @property
    def quiet(self) -> bool:
        """Whether a message sent now may skip the writer (:meth:`send_alone`): low load."""
        return (
            self._alone
            and self._eager is not None
            and not self._queue
            and self._broken is None
            and not self._closing
        )

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data``; it is sent after everything queued before it."""
        self.messages += 1
        self._enqueue(data)

    async def send_alone(self, data: bytes) -> None:
        """Send ``data`` from the calling task if the stream allows now, else queue it.

        For a message with nothing else in flight while the writer is :attr:`quiet`. It
        returns at once, without a scheduling round, unless the kernel took only part of it.
        Error handling: a failed send is raised by :meth:`run`, not here (the caller learns
        from its owner, as for a queued message). A cancel while the rest is being sent
        breaks the stream: :meth:`run` raises ``trio.BrokenResourceError``.
        """
        eager = self._eager
        if eager is None:
            self.write_nowait(data)
            return
        try:
            rest = eager.send_nowait(data)
        except trio.BrokenResourceError as exc:
            self._fail(exc)
            return
        if rest is None:  # the stream is sending something else: wait in line
            self.write_nowait(data)
            return
        self.messages += 1
        self.sends += 1
        if rest:
            try:
                await eager.finish(rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(exc)
                return
            except BaseException as exc:
                self._fail(trio.BrokenResourceError(f"write cut short: {exc!r}"))
                raise
        if self._after_send is not None:
            self._after_send()

    async def run(self) -> None:
        """Send queued data until closed."""
        queue = self._queue
        while True:
            if self._broken is not None:
                raise self._broken
            if not queue:
                if self._closing:
                    return
                await self._lot.park()
                if not queue:
                    continue
                self._alone = self._busy is None or not self._busy(len(queue))
                if not self._alone:
                    # Under load, let the tasks that are ready now queue theirs too: one more
                    # scheduling round costs less than the TLS record and syscall it saves.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            batch = queue[0] if len(queue) == 1 else b"".join(queue)
            queue.clear()
            self.sends += 1
            # Alone, the eager send saves the round inside send_all. Under load that round is
            # worth keeping: sending every batch a round sooner made batches smaller and cost
            # 9-14% more CPU per query (bench/ab.py, dnsperf at 20 clients).
            if self._alone and self._eager is not None:
                await self._eager.send_all(batch)
            else:
                await self._send_all(batch)
            if self._after_send is not None:
                self._after_send()
            if queue:  # queued while this was sent: that is load
                self._alone = False


class SocketWriter(_QueuedWriter):
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

    __slots__ = ("_blocked", "_drained", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._drained = trio.lowlevel.ParkingLot()
        self._blocked = False

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
                self._fail(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._enqueue(data)

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


class EagerSocketStream(trio.abc.HalfCloseableStream):
    """A trio stream over a connected, non-blocking stdlib socket: try first, wait if need be.

    The upstream's ``trio.SSLStream`` runs over this instead of ``trio.SocketStream``, which
    yields to the scheduler after every successful send and receive and wraps each call in
    several more layers: per query, that was ~4% of the proxy's CPU (A/B under dnsperf) and two
    scheduling rounds of latency. Here a call that the kernel can take at once costs one
    syscall and no round; only a would-block waits on the socket. ``SSLStream`` still yields
    around every transport call (its internal locks do), and a receive yields every
    ``_YIELD_EVERY`` reads besides, so a reader fed without pause cannot starve other tasks.

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
