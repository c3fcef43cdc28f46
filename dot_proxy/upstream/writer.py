"""The writer of one upstream connection: many query tasks, one stream, records coalesced."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

__all__ = ["BatchWriter", "EagerSend"]


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
    """Sending without a scheduling round when the socket takes it (see tls.RoundSavingSender)."""

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
