"""Who writes a query to an upstream's TLS stream, and when: :class:`BatchWriter`, alone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from dot_proxy.errors import fresh
from dot_proxy.upstream.tls import quickack_hook
from dot_proxy.upstream.trio_private import round_saving_sender

__all__ = ["BatchWriter", "EagerSend"]


class EagerSend(Protocol):
    """Sending without a scheduling round when the socket takes it (trio_private's
    :class:`~dot_proxy.upstream.trio_private.RoundSavingSender`)."""

    def send_nowait(self, data: bytes) -> memoryview | None: ...

    async def finish(self, rest: memoryview) -> None: ...

    async def send_all(self, data: bytes) -> None: ...


class BatchWriter:
    """The one way onto one upstream connection's stream: :meth:`send`.

    Many query tasks share a connection. Each hands its framed query to :meth:`send` and
    nothing else writes queries to the stream; how the bytes go is decided here, from the load:

    - Under load (other queries in flight, or company at the writer's last wake-up) ``send``
      queues the message, and :meth:`run`, the writer task, sends whatever queued meanwhile in
      one ``send_all``: one TLS record, one syscall, after one scheduling round that lets the
      tasks ready now queue theirs too. That round costs less than the record it saves.
    - At low load, when the writer found each message alone at its wake-up (it is *quiet*) and
      this one is the only query in flight, ``send`` sends it from the caller's task through the
      stream's :class:`EagerSend`, skipping the writer's wake-up and ``send_all``'s lock round.
      If the stream is busy sending something else, the message queues after all. A message
      the writer sends alone goes through the eager sender too.

    A cancel never cuts a write in half: the writer task is the only one that awaits a whole
    write, and the eager send is one call with no await. Only if the kernel took part of that
    record does the rest take an await; a cancel there breaks the stream, and :meth:`run`
    raises ``trio.BrokenResourceError``.

    Resource handling: :meth:`run` lives in the nursery of whoever owns the stream. It returns
    when :meth:`close` has been called and the queue is empty, or raises what sending raised
    (also a failure of an eager send, which ``send`` itself never raises); either way the owner
    closes the stream.
    """

    __slots__ = (
        "_after_send",
        "_broken",
        "_closing",
        "_eager",
        "_in_flight",
        "_lot",
        "_queue",
        "_quiet",
        "_send_all",
        "messages",
        "sends",
    )

    def __init__(
        self,
        send_all: Callable[[bytes], Awaitable[None]],
        eager: EagerSend | None,
        *,
        in_flight: Callable[[], int],
        after_send: Callable[[], None] | None = None,
    ) -> None:
        """For tests: the owner uses :meth:`over`. ``in_flight()`` counts the owner's queries
        sent or queued and not yet answered; ``after_send`` runs after each send."""
        self._send_all = send_all  # a stream's send_all (or one that behaves alike)
        self._eager = eager
        self._in_flight = in_flight
        self._after_send = after_send
        self._queue: list[bytes] = []
        self._lot = trio.lowlevel.ParkingLot()
        # Whether the writer found the last message alone: a message may then skip it. Never
        # true without an eager sender, once broken, or once closing.
        self._quiet = False
        self._closing = False
        self._broken: BaseException | None = None  # kept: through errors.fresh
        self.messages = 0  # written so far
        self.sends = 0  # sends so far; messages / sends is the batching gained

    @classmethod
    def over(cls, stream: trio.abc.SendStream, *, in_flight: Callable[[], int]) -> BatchWriter:
        """The writer of ``stream``: eager where the stream allows, TCP_QUICKACK after each send."""
        return cls(
            stream.send_all,
            round_saving_sender(stream),
            in_flight=in_flight,
            after_send=quickack_hook(stream),
        )

    async def send(self, data: bytes) -> None:
        """Send ``data`` after everything sent before it; returns at once, but for a record the
        kernel took only part of.

        Error handling: never raises but Cancelled; a failed send is raised by :meth:`run`, and
        the owner fails the queries on the stream (this one included).
        """
        self.messages += 1
        if self._quiet and not self._queue and self._in_flight() <= 1:
            eager = self._eager
            assert eager is not None  # quiet says so
            try:
                rest = eager.send_nowait(data)
            except trio.BrokenResourceError as exc:
                self._fail(exc)
                return
            if rest is not None:
                self.sends += 1
                if rest:
                    await self._finish(eager, rest)
                elif self._after_send is not None:
                    self._after_send()
                return
            # The stream is sending something else: wait in line.
        self._queue.append(data)
        if len(self._queue) == 1:
            self._lot.unpark()

    async def _finish(self, eager: EagerSend, rest: memoryview) -> None:
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

    def _fail(self, exc: BaseException) -> None:
        # A send from a caller's task failed: the writer task wakes to raise it.
        if self._broken is None:
            self._broken = fresh(exc)
        self._quiet = False
        self._lot.unpark()

    def close(self) -> None:
        """Let :meth:`run` return once everything queued so far is sent."""
        self._closing = True
        self._quiet = False
        self._lot.unpark()

    def _busy(self, queued: int) -> bool:
        # More messages are likely in a moment: a burst queued, or queries in flight besides.
        return queued > 1 or self._in_flight() > queued

    async def run(self) -> None:
        """Send queued data until closed."""
        queue = self._queue
        while True:
            if self._broken is not None:
                raise fresh(self._broken)
            if not queue:
                if self._closing:
                    return
                await self._lot.park()
                if not queue:
                    continue
                if self._eager is not None and not self._busy(len(queue)):
                    self._quiet = self._broken is None and not self._closing
                else:
                    self._quiet = False
                    await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            batch = queue[0] if len(queue) == 1 else b"".join(queue)
            queue.clear()
            self.sends += 1
            # Alone, the eager send saves the round inside send_all; under load that round
            # lets the next batch grow (docs/performance.md).
            if self._quiet and self._eager is not None:
                await self._eager.send_all(batch)
            else:
                await self._send_all(batch)
            if self._after_send is not None:
                self._after_send()
            if queue:  # queued while this was sent: that is load
                self._quiet = False
