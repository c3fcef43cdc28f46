"""TLS connections to upstream resolvers: open, pipeline, match answers, pool.

RFC 7858 §3.4 asks a DoT client to keep connections open and to pipeline queries on them; RFC 7766
§6.2.1 lets answers come back in any order, matched by ID. One :class:`Connection` is one
``trio.SSLStream`` with a reader task, a writer task and a watchdog, all in the upstream's nursery,
never in the query task that asked for it. An :class:`Upstream` is the pool of connections to one
resolver. trio and ssl exceptions are mapped to :mod:`dot_proxy.errors` here and nowhere else.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress

import trio

from dot_proxy import pins
from dot_proxy.config import Config, UpstreamSpec
from dot_proxy.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTLSError,
    WireError,
)
from dot_proxy.streams import BatchWriter, EagerSocketStream
from dot_proxy.wire import (
    HEADER_SIZE,
    NEED_DATA,
    FrameDecoder,
    answer_matches,
    frame_with_id,
    message_id,
)

__all__ = [
    "Connection",
    "Race",
    "RaceLost",
    "Upstream",
    "check_pins",
    "make_ssl_context",
    "open_tls",
    "open_upstreams",
    "quickack_hook",
]

log = logging.getLogger(__name__)

_RECEIVE_SIZE = 65536


def make_ssl_context(*, ca_file: str | None, pins_only: bool = False) -> ssl.SSLContext:
    """The client TLS context for upstreams (RFC 7858 §3.2, RFC 8310 §5 strict profile).

    System CAs, or only ``ca_file`` when given; certificate and host name checked; TLS 1.2 at
    least; ALPN ``dot`` (RFC 7858 §3.1 does not require it, but servers that host several
    protocols on one port use it). ``pins_only`` is for upstreams authenticated by SPKI pins
    alone (RFC 7858 §4.2): the chain and name go unchecked because the pin check after the
    handshake, which nothing skips, is the authentication.
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["dot"])
    if pins_only:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_pins(spec: UpstreamSpec, stream: trio.SSLStream[EagerSocketStream]) -> None:
    """Raise :class:`UpstreamTLSError` unless the server's key matches one of ``spec.pins``.

    Python before 3.13 exposes only the leaf certificate, so the pin must be the server's
    own key (that is what the openssl recipe in the README computes).
    """
    if not spec.pins:
        return
    leaf = stream.getpeercert(binary_form=True)
    if leaf is None or not pins.matches(spec.pins, [leaf]):
        try:
            presented = pins.spki_sha256_b64(leaf) if leaf else "none"
        except pins.PinError:
            presented = "unreadable"
        raise UpstreamTLSError(
            f"{spec.label}: server key pin {presented} matches none of the configured pins"
        )


class Race:
    """The attempts at one query, possibly on several upstreams at once (hedging).

    Every attempt's pending entry wakes the race's task when it completes; ``answer`` is set
    by whichever attempt wins, and the others then give up their queries (abandoned, so the
    connections stay healthy). A plain query is a race with one runner.

    Several tasks may wait on one race (a query and its hedge); a wake wakes them all, and a
    wake with nobody waiting lets the next wait return at once. Built on trio's low-level
    parking rather than an Event per wait: this is on every query's path.
    """

    __slots__ = ("_waiters", "_woken", "answer")

    def __init__(self) -> None:
        self._waiters: list[trio.lowlevel.Task] = []
        self._woken = False
        self.answer: bytes | None = None

    def wake(self) -> None:
        """Tell the waiting tasks that something they may care about happened."""
        waiters = self._waiters
        if not waiters:
            self._woken = True
            return
        for task in waiters:
            trio.lowlevel.reschedule(task)
        waiters.clear()

    async def wait(self) -> None:
        """Sleep until the next :meth:`wake` (callers re-check their state after it)."""
        if self._woken:
            self._woken = False
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        self._waiters.append(task)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class RaceLost(UpstreamError):
    """Another attempt at the same query answered first; its answer is in ``race.answer``."""


def _race_lost(spec: UpstreamSpec) -> RaceLost:
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
    ) -> None:
        self.spec = spec
        self._ssl_context = ssl_context
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
        the connection healthy: the query's bytes are written by the writer task, never by the
        caller, so a cancel cannot cut a write in half.
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
        writer.write_nowait(frame_with_id(message, wire_id))
        try:
            return await self._answer_for(pending)
        except BaseException:
            if pending_map.get(wire_id) is pending:
                pending.abandoned = True
            raise

    async def _answer_for(self, pending: _Pending) -> bytes:
        race = pending.race
        while pending.answer is None:
            if pending.error is not None:
                raise pending.error
            if race.answer is not None:
                raise _race_lost(self.spec)
            await race.wait()
        return pending.answer

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
                raise _race_lost(self.spec)
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
                    stream, after_send=quickack_hook(stream), busy=self._has_other_queries
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
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _connect(self) -> trio.SSLStream[EagerSocketStream]:
        with trio.move_on_after(self._connect_timeout):
            return await open_tls(self.spec, self._ssl_context)
        raise UpstreamConnectError(
            f"{self.spec.label}: no TLS connection within {self._connect_timeout:g} s"
        )

    async def _read_loop(self, stream: trio.SSLStream[EagerSocketStream]) -> None:
        decoder = FrameDecoder()
        label = self.spec.label
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


async def open_tls(
    spec: UpstreamSpec, context: ssl.SSLContext
) -> trio.SSLStream[EagerSocketStream]:
    """Connect to ``spec`` and complete an authenticated TLS handshake (no deadline of its own).

    Error handling: raises :class:`UpstreamConnectError` (TCP) or :class:`UpstreamTLSError`
    (handshake, certificate, name or pins). Resource handling: on error nothing stays open;
    on success the caller owns the stream.
    """
    try:
        connected = await trio.open_tcp_stream(spec.host, spec.port)
    except OSError as exc:
        raise UpstreamConnectError(f"{spec.label}: connect failed: {exc.strerror or exc}") from exc
    # trio connected it (happy eyeballs, TCP_NODELAY, TCP_NOTSENT_LOWAT); the hot path then
    # runs over the bare socket (see EagerSocketStream).
    tcp = EagerSocketStream(socket.socket(fileno=connected.socket.detach()))
    # https_compatible: DNS messages are length-framed, so a TCP close without TLS close_notify
    # cannot truncate an answer unnoticed; treating it as plain EOF avoids spurious errors from
    # servers that skip close_notify, and closing costs no round trip.
    stream = trio.SSLStream(tcp, context, server_hostname=spec.auth_name, https_compatible=True)
    try:
        await stream.do_handshake()
        # RFC 8310 §5: strict profile; nothing is written before the pins matched.
        check_pins(spec, stream)
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise _handshake_error(spec, exc) from exc
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def _handshake_error(spec: UpstreamSpec, exc: trio.BrokenResourceError) -> UpstreamError:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return UpstreamTLSError(
            f"{spec.label}: certificate not trusted for {spec.auth_name!r}: {cause.verify_message}"
        )
    if isinstance(cause, ssl.SSLError):
        return UpstreamTLSError(f"{spec.label}: TLS handshake failed: {cause.reason or cause}")
    return UpstreamConnectError(f"{spec.label}: connection lost during the TLS handshake")


def quickack_hook(stream: trio.SSLStream[EagerSocketStream]) -> Callable[[], None] | None:
    # Linux delays ACKs; a TLS 1.3 server that sends its session ticket first and then the
    # answer can sit ~40 ms on our delayed ACK. TCP_QUICKACK is not sticky, so it is set
    # again after each write.
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return None
    sock = stream.transport_stream.socket

    def set_quickack() -> None:
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    return set_quickack


class Upstream:
    """The pool of connections to one resolver.

    Resource handling: connections run in ``nursery`` (the upstreams' nursery, owned by
    :func:`open_upstreams`), so they outlive the query that opened them and die with the server.
    """

    def __init__(
        self,
        spec: UpstreamSpec,
        ssl_context: ssl.SSLContext,
        config: Config,
        nursery: trio.Nursery,
    ) -> None:
        self.spec = spec
        self._ssl_context = ssl_context
        self._config = config
        self._nursery = nursery
        self._connections: list[Connection] = []
        # Queries waiting for a free slot, in arrival order (a dict as an ordered set).
        self._room_waiters: dict[Race, None] = {}
        self._reuse = config.reuse
        self._max_connections = config.max_connections

    @property
    def connections(self) -> Sequence[Connection]:
        """The connections open or opening now."""
        return tuple(self._connections)

    async def query(self, message: bytes, key: bytes, race: Race | None = None) -> bytes:
        """Resolve one query over this upstream; the answer carries an arbitrary ID.

        Error handling: raises an :class:`UpstreamError` subclass (:class:`RaceLost` when
        another attempt in ``race`` won). A connection that dies with the query in flight
        costs one retry on another connection (RFC 7858 §3.4).
        """
        if not self._reuse:
            return await self._query_on_own_connection(message, key, race)
        try:
            return await (await self._checkout(race)).exchange(message, key, race)
        except (UpstreamClosed, UpstreamProtocolError):
            # A connection retired for talking nonsense (a frame too short to be DNS) failed
            # every query on it; like one that closed, it costs them one retry, not SERVFAIL.
            return await (await self._checkout(race)).exchange(message, key, race)

    async def _checkout(self, race: Race | None) -> Connection:
        while True:
            for connection in self._connections:
                if connection.has_room:
                    break
            else:
                if len(self._connections) >= self._max_connections:
                    await self._wait_for_room(race)
                    continue
                connection = self._open()
            if not connection.ready.is_set():
                # Everyone who wants a connection while one is opening waits for that one:
                # one handshake, not a thundering herd.
                await connection.wait_ready(race)
            if connection.closed:
                raise connection.error or UpstreamClosed(f"{self.spec.label}: closed")
            if connection.has_room:
                return connection

    def _open(self) -> Connection:
        connection = Connection(
            self.spec,
            self._ssl_context,
            self._config,
            on_room=self._wake_one,
            on_closed=self._forget,
        )
        self._connections.append(connection)
        self._nursery.start_soon(connection.run)
        return connection

    async def _wait_for_room(self, race: Race | None) -> None:
        """Wait in line until a slot frees on some connection.

        One freed slot wakes one waiter, first come first served: waking them all would cost
        every answer a wake-up per waiting query, which under overload (an upstream freezes
        and the pool fills) is what keeps the proxy from ever catching up.

        Error handling: raises :class:`RaceLost` once ``race`` is won elsewhere — a query
        whose hedge answered must not sit here until its deadline (a hung upstream fills its
        pool with abandoned queries) — and then passes its turn on.
        """
        waiter = race if race is not None else Race()
        if waiter.answer is not None:
            raise _race_lost(self.spec)
        self._room_waiters[waiter] = None
        try:
            await waiter.wait()
        except BaseException:
            self._leave_line(waiter)
            raise
        if waiter.answer is not None:
            self._leave_line(waiter)
            raise _race_lost(self.spec)
        # Woken by a slot (out of line now), or by its race (still in line: look anyway).
        self._room_waiters.pop(waiter, None)

    def _leave_line(self, waiter: Race) -> None:
        # Out of line already means a slot was handed to this waiter, which will not take
        # it: the slot goes to the next in line.
        if self._room_waiters.pop(waiter, False) is False:
            self._wake_one()

    def _wake_one(self) -> None:
        if self._room_waiters:
            waiter = next(iter(self._room_waiters))
            del self._room_waiters[waiter]
            waiter.wake()

    def _forget(self, connection: Connection) -> None:
        # A retired connection may make room for a new one: every waiter looks again.
        if connection in self._connections:
            self._connections.remove(connection)
        waiters, self._room_waiters = self._room_waiters, {}
        for waiter in waiters:
            waiter.wake()

    async def _query_on_own_connection(
        self, message: bytes, key: bytes, race: Race | None
    ) -> bytes:
        # The original design, kept for comparison in the benchmark: one connection per query.
        connection = Connection(
            self.spec, self._ssl_context, self._config, on_room=_nothing, on_closed=_nothing
        )
        self._nursery.start_soon(connection.run)
        try:
            await connection.wait_ready(race)
            if connection.closed:
                raise connection.error or UpstreamClosed(f"{self.spec.label}: closed")
            return await connection.exchange(message, key, race)
        finally:
            connection.retire(UpstreamClosed("query done"))


def _nothing(*_args: object) -> None:
    return None


@asynccontextmanager
async def open_upstreams(config: Config) -> AsyncIterator[list[Upstream]]:
    """Open a pool per configured upstream; all their connections close on exit.

    Resource handling: the pools' nursery is cancelled on exit, which closes every connection.
    """
    verified = make_ssl_context(ca_file=config.ca_file)
    pins_only = make_ssl_context(ca_file=config.ca_file, pins_only=True)
    async with trio.open_nursery() as nursery:
        try:
            yield [
                Upstream(spec, verified if spec.check_name else pins_only, config, nursery)
                for spec in config.upstreams
            ]
        finally:
            nursery.cancel_scope.cancel()
