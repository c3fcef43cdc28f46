"""One pipelined TLS connection to an upstream.

RFC 7858 §3.4 asks a DoT client to keep connections open and to pipeline queries on them; RFC 7766
§6.2.1 lets answers come back in any order, matched by ID. One :class:`Connection` is one
``trio.SSLStream`` with a reader task, a writer task and a watchdog, all in the upstream's nursery,
never in the query task that asked for it. A query's task waits for its answer in a
:class:`~dot_proxy.upstream.race.Race`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

import trio

from dot_proxy.config import Config, UpstreamSpec
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame_with_id
from dot_proxy.core.message import HEADER_SIZE, answer_matches, message_id
from dot_proxy.errors import (
    RaceLost,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    WireError,
    fresh,
)
from dot_proxy.upstream.race import Race
from dot_proxy.upstream.socket_stream import EagerSocketStream
from dot_proxy.upstream.tls import TLSSessions, open_tls, quickack_hook
from dot_proxy.upstream.trio_private import buffered_plaintext, eager_sender
from dot_proxy.upstream.writer import BatchWriter

__all__ = ["Connection", "race_lost"]

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536


def race_lost(spec: UpstreamSpec) -> RaceLost:
    return RaceLost(f"{spec.label}: another upstream answered first")


class _Pending:
    """One query in flight on a connection, waiting for its answer."""

    __slots__ = ("abandoned", "answer", "error", "key", "race")

    def __init__(self, key: bytes, race: Race) -> None:
        self.key = key
        self.race = race
        self.answer: bytes | None = None
        self.error: UpstreamError | None = None
        # A query whose task gave up keeps its ID reserved until the answer comes, so that a
        # late answer can never be taken for the answer to a later query with the same ID.
        self.abandoned = False


class Connection:
    """One TLS connection to an upstream, with many queries in flight (RFC 7766 §6.2.1.1).

    Resource handling: :meth:`run` owns the stream and closes it when it returns; it runs in the
    upstream's nursery. :meth:`retire` takes the connection out of service at once: queries in
    flight fail with :class:`UpstreamClosed` (the caller retries them elsewhere), and nothing is
    ever written to it again.
    """

    def __init__(
        self,
        spec: UpstreamSpec,
        ssl_context: ssl.SSLContext,
        config: Config,
        *,
        on_room: Callable[[], None],
        on_closed: Callable[[Connection], None],
        sessions: TLSSessions | None = None,
    ) -> None:
        self.spec = spec
        self._ssl_context = ssl_context
        self._sessions = sessions  # the pool's: resume the last connection's TLS session
        self._max_pipeline = config.max_pipeline
        self._connect_timeout = config.connect_timeout
        self._stall_timeout = config.stall_timeout
        # Silence a connection that never answered is allowed: past every deadline of the
        # queries on it (see _watchdog).
        self._patience = config.timeout + config.stall_timeout
        self._idle_timeout = config.upstream_idle_timeout
        self._on_room = on_room
        self._on_closed = on_closed
        self.ready = trio.Event()
        self._ready_races: list[Race] = []
        self.error: UpstreamError | None = None
        self.closed = False
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._writer: BatchWriter | None = None
        self._scope = trio.CancelScope()
        now = trio.current_time()
        self._received_at = now
        self._busy_since = now
        self._answered = False

    @property
    def in_flight(self) -> int:
        """Queries sent and not yet answered, including abandoned ones."""
        return len(self._pending)

    @property
    def has_room(self) -> bool:
        """Whether another query may be pipelined on this connection now."""
        return not self.closed and len(self._pending) < self._max_pipeline

    async def exchange(self, message: bytes, key: bytes, race: Race | None = None) -> bytes:
        """Send one query and wait for its answer; the answer carries the connection's ID.

        Error handling: raises :class:`UpstreamClosed` if the connection is retired before the
        answer arrives (the query may be retried on another connection), and
        :class:`RaceLost` if another attempt in ``race`` answered first. Cancellation leaves
        the connection healthy: the query's bytes are queued for the writer task or, alone on
        a quiet connection, sent from here in one non-blocking call, so a cancel cannot cut a
        write in half. (Only if the kernel took part of that record does the rest take an
        await; a cancel then breaks the connection, on which this query was the only one.)
        """
        writer = self._writer
        if writer is None or self.closed:
            raise UpstreamClosed(f"{self.spec.label}: connection is not open")
        if race is None:
            race = Race()
        pending_map = self._pending
        wire_id = self._free_id()
        pending = _Pending(key, race)
        if not pending_map:
            self._busy_since = trio.current_time()
        pending_map[wire_id] = pending
        data = frame_with_id(message, wire_id)
        try:
            if writer.quiet and len(pending_map) == 1:
                # Low load: this task sends it, a scheduling round sooner (BatchWriter).
                await writer.send_alone(data)
            else:
                writer.write_nowait(data)
            while pending.answer is None and pending.error is None and race.answer is None:
                await race.wait()
        except BaseException:
            if pending_map.get(wire_id) is pending:
                pending.abandoned = True
            raise
        if pending.answer is not None:
            return pending.answer
        if pending_map.get(wire_id) is pending:
            pending.abandoned = True  # its answer may come yet: keep the ID, drop the answer
        raise fresh(pending.error) if pending.error else race_lost(self.spec)

    def failure(self) -> UpstreamError:
        """What to raise in a query that finds this connection closed: a copy of its error."""
        return fresh(self.error) if self.error else UpstreamClosed(f"{self.spec.label}: closed")

    def _has_other_queries(self, queued: int) -> bool:
        # Under load: a burst queued, or answers outstanding besides the queued queries.
        return queued > 1 or len(self._pending) > queued

    async def wait_ready(self, race: Race | None) -> None:
        """Wait until the connection is open or failed, or until ``race`` is won elsewhere.

        Error handling: raises :class:`RaceLost` in the last case, so a query whose hedge
        answered does not sit out a hanging handshake.
        """
        if race is None:
            await self.ready.wait()
            return
        self._ready_races.append(race)
        while not self.ready.is_set():
            if race.answer is not None:
                raise race_lost(self.spec)
            await race.wait()

    def _set_ready(self) -> None:
        self.ready.set()
        races, self._ready_races = self._ready_races, []
        for race in races:
            race.wake()

    def _free_id(self) -> int:
        # RFC 7766 §6.2.1: an ID is never reused while a query with it is in flight. Counting
        # up delays reuse as long as possible.
        wire_id = self._next_id
        while wire_id in self._pending:
            wire_id = (wire_id + 1) & 0xFFFF
        self._next_id = (wire_id + 1) & 0xFFFF
        return wire_id

    def retire(self, reason: UpstreamError) -> None:
        """Take the connection out of service now and fail its queries with ``reason``."""
        if self.closed:
            return
        self.closed = True
        reason = fresh(reason)  # it may carry the frames that raised it (see errors.fresh)
        if self.error is None:
            self.error = reason
        self._scope.cancel()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.abandoned:
                entry.error = reason
                entry.race.wake()
        self._set_ready()
        self._on_closed(self)

    async def run(self) -> None:
        """Connect, then serve queries until retired. Never raises but Cancelled."""
        stream: trio.SSLStream[EagerSocketStream] | None = None
        try:
            with self._scope:
                try:
                    stream = await self._connect()
                except UpstreamError as exc:
                    log.warning("%s", exc)
                    self.retire(exc)
                    return
                except Exception as exc:
                    # A bug or an unexpected OS error while connecting must fail this
                    # connection's queries, not escape into the upstreams' nursery and stop
                    # the whole proxy.
                    log.exception("%s: connecting failed", self.spec.label)
                    self.retire(UpstreamConnectError(f"{self.spec.label}: {exc!r}"))
                    return
                self._writer = BatchWriter(
                    stream.send_all,
                    after_send=quickack_hook(stream),
                    busy=self._has_other_queries,
                    eager=eager_sender(stream),
                )
                self._set_ready()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_loop, stream)
                    nursery.start_soon(self._write_loop, self._writer)
                    nursery.start_soon(self._watchdog)
        finally:
            self.retire(UpstreamClosed(f"{self.spec.label}: connection closed"))
            if self._writer is not None:
                log.debug(
                    "%s: connection closed (%s) after %d queries in %d writes",
                    self.spec.label,
                    self.error,
                    self._writer.messages,
                    self._writer.sends,
                )
                # The writer holds a method of ours (busy=): a cycle that would keep the
                # closed stream and its buffers until a pass of the cyclic collector.
                self._writer = None
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _connect(self) -> trio.SSLStream[EagerSocketStream]:
        with trio.move_on_after(self._connect_timeout):
            return await open_tls(self.spec, self._ssl_context, self._sessions)
        raise UpstreamConnectError(
            f"{self.spec.label}: no TLS connection within {self._connect_timeout:g} s"
        )

    async def _read_loop(self, stream: trio.SSLStream[EagerSocketStream]) -> None:
        decoder = FrameDecoder()
        label = self.spec.label
        # Every answer the last read brought in is dispatched before the next await: they
        # wake their tasks in one scheduling round (see buffered_plaintext).
        drain = buffered_plaintext(stream)
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.retire(UpstreamClosed(f"{label}: connection broke: {exc.__cause__ or exc}"))
                return
            if not data:
                self.retire(UpstreamClosed(f"{label}: closed by the upstream"))
                return
            now = trio.current_time()
            try:
                decoder.feed(data)
                if more := drain():
                    decoder.feed(more)
            except WireError as exc:
                self.retire(UpstreamProtocolError(f"{label}: {exc}"))
                return
            while (message := decoder.next_message()) is not NEED_DATA:
                if not self._dispatch(message, now):
                    self.retire(UpstreamProtocolError(f"{label}: sent a message that is not DNS"))
                    return
            # For the watchdog, only answers and the bytes of one still arriving show that the
            # connection is alive: messages that answer nothing (unknown ID, another question)
            # must not keep a connection that never answers in the pool forever.
            if decoder.buffered:
                self._received_at = now

    def _dispatch(self, answer: bytes, now: float) -> bool:
        """Hand an answer to the query waiting for it; False if the upstream talks nonsense."""
        if len(answer) < HEADER_SIZE:
            return False
        wire_id = message_id(answer)
        pending = self._pending.get(wire_id)
        if pending is None:
            log.debug("%s: dropped an answer with unknown ID %d", self.spec.label, wire_id)
            return True
        if pending.abandoned:
            del self._pending[wire_id]
        elif not answer_matches(answer, pending.key):
            # RFC 7858 §3.3 / RFC 5452: an answer must match the question too; never pass on
            # one that does not. The query waits on for the right one.
            log.debug("%s: dropped an answer for another question", self.spec.label)
            return True
        else:
            del self._pending[wire_id]
            pending.answer = answer
            self._answered = True
            pending.race.wake()
        self._received_at = now
        self._on_room()  # a slot is free: the pool hands it to one waiting query, if any
        return True

    async def _write_loop(self, writer: BatchWriter) -> None:
        try:
            await writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.retire(UpstreamClosed(f"{self.spec.label}: write failed: {exc.__cause__ or exc}"))

    async def _watchdog(self) -> None:
        # One task per connection, waking a few times a second, instead of a cancel scope per
        # query: a connection with queries outstanding that has received no answer (nor part
        # of one) for stall_timeout is dead (a NAT dropped it, the server hangs) and is
        # retired, so its queries are retried elsewhere well within their deadline. That holds
        # only for a connection that has answered before: on one that never has (fresh, or the
        # retry's), silence is a slow resolver (seconds on a cold name) or a hung one, and
        # another connection would not answer sooner, so it waits out its queries' deadline
        # (issue 2: an answer within the deadline reaches the client; a hang is SERVFAIL at the
        # deadline). An idle one is closed.
        tick = min(self._stall_timeout, self._idle_timeout) / 4
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if self._pending:
                quiet_since = max(self._received_at, self._busy_since)
                limit = self._stall_timeout if self._answered else self._patience
                if now - quiet_since >= limit:
                    self.retire(
                        UpstreamClosed(
                            f"{self.spec.label}: no answer for {limit:g} s; connection retired"
                        )
                    )
                    return
            elif now - max(self._busy_since, self._received_at) >= self._idle_timeout:
                log.debug("%s: closing idle connection", self.spec.label)
                self.retire(UpstreamClosed(f"{self.spec.label}: closed when idle"))
                return
