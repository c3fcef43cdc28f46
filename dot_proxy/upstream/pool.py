"""The pool of connections to one upstream resolver (RFC 7858 §3.4: reuse and pipeline).

An :class:`Upstream` opens :class:`~dot_proxy.upstream.connection.Connection` objects as queries
need them, up to a bound, shares a handshake among concurrent first queries, hands each query a
connection with room, and retries a query once when its connection closed under it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from dot_proxy.config import Config, PlainSpec, UpstreamSpec
from dot_proxy.errors import UpstreamClosed, UpstreamProtocolError
from dot_proxy.upstream.connection import Connection
from dot_proxy.upstream.plain import PlainUpstream
from dot_proxy.upstream.race import Race, race_lost
from dot_proxy.upstream.tls import Connect, tls_connector
from dot_proxy.upstream.trio_private import missing_internals
from dot_proxy.upstream.waiting import Waiter, WaitLine

__all__ = ["Connect", "Upstream", "default_connector", "open_member", "open_upstreams"]

log = logging.getLogger(__name__)


class Upstream:
    """The pool of connections to one resolver.

    Resource handling: connections run in ``nursery`` (the upstreams' nursery, owned by
    :func:`open_upstreams`), so they outlive the query that opened them and die with the server.
    """

    def __init__(
        self, spec: UpstreamSpec, config: Config, nursery: trio.Nursery, *, connect: Connect
    ) -> None:
        self.spec = spec
        self._connect = connect
        self._config = config
        self._nursery = nursery
        self._connections: list[Connection] = []
        self._room = WaitLine()  # queries waiting for a free slot on some connection
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
            self._config,
            connect=self._connect,
            on_room=self._room.wake_next,
            on_closed=self._forget,
        )
        self._connections.append(connection)
        self._nursery.start_soon(connection.run)
        return connection

    async def _wait_for_room(self, race: Race | None) -> None:
        """Wait in line (:class:`WaitLine`: one freed slot wakes one query) until a slot frees.

        Error handling: raises :class:`RaceLost` once ``race`` is won elsewhere — a query
        whose hedge answered must not sit here until its deadline (a hung upstream fills its
        pool with abandoned queries) — and then hands its turn on.
        """
        if race is None:
            await self._room.wait(Waiter())
            return
        if race.answer is not None:
            raise race_lost(self.spec.label)
        # The race is the waiter: its winning elsewhere wakes it too.
        got_turn = await self._room.wait(race)
        if race.answer is not None:
            if got_turn:
                self._room.wake_next()
            raise race_lost(self.spec.label)

    def _forget(self, connection: Connection) -> None:
        # A retired connection may make room for a new one: every waiter looks again.
        if connection in self._connections:
            self._connections.remove(connection)
        self._room.wake_all()


def default_connector(config: Config, *, warn: bool = True) -> Connect:
    """TLS as configured (:func:`~dot_proxy.upstream.tls.tls_connector`), after a look at
    whether this trio has what :mod:`~dot_proxy.upstream.trio_private` needs (a warning if not,
    unless ``warn`` is false: it was given once already)."""
    if warn and (problems := missing_internals()):
        log.warning(
            "trio %s: %s; upstream reads and writes take trio's public path, a scheduling "
            "round slower each (dot-proxy is tested with the trio versions its package names)",
            trio.__version__,
            "; ".join(problems),
        )
    return tls_connector(config.ca_file, config.ca_data)


def _member(
    spec: UpstreamSpec | PlainSpec, config: Config, nursery: trio.Nursery, connect: Connect
) -> Upstream | PlainUpstream:
    # A plain: spec gets no pool: a socket per query.
    if isinstance(spec, PlainSpec):
        return PlainUpstream(spec, nursery)
    return Upstream(spec, config, nursery, connect=connect)


@asynccontextmanager
async def open_member(
    spec: UpstreamSpec | PlainSpec, config: Config, *, connect: Connect
) -> AsyncIterator[Upstream | PlainUpstream]:
    """One upstream's pool (a :class:`~dot_proxy.upstream.plain.PlainUpstream` for a
    ``plain:`` spec), with a nursery of its own.

    Resource handling: its nursery is cancelled on exit, which closes every connection.
    """
    async with trio.open_nursery() as nursery:
        try:
            yield _member(spec, config, nursery, connect)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_upstreams(
    config: Config,
    *,
    specs: Sequence[UpstreamSpec | PlainSpec] | None = None,
    connect: Connect | None = None,
) -> AsyncIterator[list[Upstream | PlainUpstream]]:
    """Open a pool per upstream, ``config.upstreams`` or ``specs`` (a ``--forward`` zone's);
    all their connections close on exit. A ``plain:`` spec gets a
    :class:`~dot_proxy.upstream.plain.PlainUpstream` (no pool: a socket per query).

    ``connect`` opens a connection's stream: by default :func:`default_connector`; tests and
    the fuzz harness pass their own.
    Resource handling: the pools' nursery is cancelled on exit, which closes every connection.
    """
    if connect is None:
        connect = default_connector(config)
    async with trio.open_nursery() as nursery:
        specs = config.upstreams if specs is None else specs
        upstreams = [_member(spec, config, nursery, connect) for spec in specs]
        try:
            yield upstreams
        finally:
            nursery.cancel_scope.cancel()
