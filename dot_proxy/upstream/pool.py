"""The pool of connections to one upstream resolver (RFC 7858 §3.4: reuse and pipeline).

An :class:`Upstream` opens :class:`~dot_proxy.upstream.connection.Connection` objects as queries
need them, up to a bound, shares a handshake among concurrent first queries, hands each query a
connection with room, and retries a query once when its connection closed under it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from dot_proxy.config import Config, PlainSpec, UpstreamSpec
from dot_proxy.errors import UpstreamClosed, UpstreamProtocolError
from dot_proxy.upstream.connection import Connection, race_lost
from dot_proxy.upstream.plain import PlainUpstream
from dot_proxy.upstream.race import Race
from dot_proxy.upstream.tls import TLSSessions, make_ssl_context

__all__ = ["Upstream", "open_upstreams"]

log = logging.getLogger(__name__)


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
        self._max_connections = config.max_connections
        # A reconnection resumes the last connection's session (RFC 8446 §2.2): one round
        # trip less for TLS 1.2, no certificate chain; offered to this upstream only.
        self._sessions = TLSSessions()

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
        connections = self._connections
        if connections and connections[0].ready.is_set() and connections[0].has_room:
            # The usual case, a warm pool with room: no checkout coroutine on the hot path.
            connection = connections[0]
        else:
            connection = await self._checkout(race)
        try:
            return await connection.exchange(message, key, race)
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
                raise connection.failure()
            if connection.has_room:
                return connection

    def _open(self) -> Connection:
        connection = Connection(
            self.spec,
            self._ssl_context,
            self._config,
            on_room=self._wake_one,
            on_closed=self._forget,
            sessions=self._sessions,
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
            raise race_lost(self.spec)
        self._room_waiters[waiter] = None
        try:
            await waiter.wait()
        except BaseException:
            self._leave_line(waiter)
            raise
        if waiter.answer is not None:
            self._leave_line(waiter)
            raise race_lost(self.spec)
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


@asynccontextmanager
async def open_upstreams(
    config: Config, *, specs: Sequence[UpstreamSpec | PlainSpec] | None = None
) -> AsyncIterator[list[Upstream | PlainUpstream]]:
    """Open a pool per upstream, ``config.upstreams`` or ``specs`` (a ``--forward`` zone's);
    all their connections close on exit. A ``plain:`` spec gets a
    :class:`~dot_proxy.upstream.plain.PlainUpstream` (no pool: a socket per query).

    Resource handling: the pools' nursery is cancelled on exit, which closes every connection.
    """
    verified = make_ssl_context(ca_file=config.ca_file, ca_data=config.ca_data)
    pins_only = make_ssl_context(ca_file=config.ca_file, ca_data=config.ca_data, pins_only=True)
    async with trio.open_nursery() as nursery:
        upstreams: list[Upstream | PlainUpstream] = []
        for spec in config.upstreams if specs is None else specs:
            if isinstance(spec, PlainSpec):
                upstreams.append(PlainUpstream(spec, nursery))
            else:
                context = verified if spec.check_name else pins_only
                upstreams.append(Upstream(spec, context, config, nursery))
        try:
            yield upstreams
        finally:
            nursery.cancel_scope.cancel()
