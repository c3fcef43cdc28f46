"""Per-query answer policy, no sockets: the cache first, then the upstreams, coalesced.

A :class:`Resolver` sits between a query's task (``handler``) and the upstream group. With the
cache on (``--cache-size`` > 0):

- a fresh answer is served from the cache (:meth:`Resolver.answer_from_cache`, called where the
  query is read, with no task and no await), and one in the last tenth of its TTL is refreshed
  in the background (prefetch), so a popular name never expires while in use;
- identical queries (same cache key) in flight at once make one upstream query: the first
  asks, the others wait for its answer (coalescing);
- an expired answer kept for serve-stale (RFC 8767) is refreshed in the background; a query
  for it waits up to the client response timer (1.8 s), then gets the stale answer (TTL 30)
  if the upstreams have not answered, or have failed (SERVFAIL, REFUSED, an error), and
  after a failed refresh gets it at once for the failure recheck time (30 s).

With the cache off every query goes to the upstreams as it comes, as a plain forwarder. Either
way a query goes to the upstream group its route names (:mod:`dot_proxy.routing`: the default
one, or a ``--forward`` zone's), and the resolver makes its wire form for that hop: the
client's EDNS Client Subnet option removed (RFC 7871 §11.1; not with ``--keep-ecs``), padded
on an encrypted hop (RFC 8467). It turns the upstream's answer back into the client's: ECS
and padding stripped, its ID and question, cut to its UDP size (RFC 1035 §4.2.1, RFC 6891
§6.2.5). The cache is one for every group: its key is the question, whatever zone it is in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Final

import trio

from dot_proxy.config import Config
from dot_proxy.core.cache import AnswerCache, CachedAnswer, cache_key
from dot_proxy.core.ecs import strip_ecs
from dot_proxy.core.edns import pad_query, strip_padding
from dot_proxy.core.local_zones import Forward
from dot_proxy.core.message import HEADER_SIZE, Query, Rcode, truncate_for_udp
from dot_proxy.errors import UpstreamError, fresh
from dot_proxy.routing import Routes, Target, open_targets, start_routes
from dot_proxy.upstream.group import UpstreamGroup
from dot_proxy.upstream.registry import open_registry

__all__ = ["Resolver", "cache_for", "open_resolver"]

log = logging.getLogger(__name__)

#: RFC 8767 §5: how long a client waits for the upstreams before it gets a stale answer.
CLIENT_RESPONSE_TIMER: Final = 1.8
#: RFC 8767 §5: after a failed refresh, stale answers go out at once for this long.
FAILURE_RECHECK: Final = 30.0
#: Background refreshes (prefetch, stale) at once at most: past it a prefetch is skipped (the
#: next hit tries again) and a stale answer is served without a refresh.
MAX_REFRESHES: Final = 256
#: Recent cached answers remembered by the query's bytes (see :class:`_Repeat`), per transport.
REPEATS: Final = 4096
_SOFT_FAILURES: Final = frozenset({Rcode.SERVFAIL, Rcode.REFUSED})


class _Repeat:
    """A cached answer as last sent, remembered by the query's bytes after its ID.

    A stub asks for the same names in the same bytes again and again; for those the answer is
    the same too, but for the ID, until the answer's TTLs tick down a second, so the next one
    costs a dictionary look-up and not a parse. Kept while ``entry`` is in the cache.
    """

    __slots__ = ("age", "entry", "key", "reply")

    def __init__(self, key: bytes, entry: CachedAnswer, age: int, reply: bytes) -> None:
        self.key = key
        self.entry = entry
        self.age = age
        self.reply = reply  # everything but the ID


class _Flight:
    """One upstream query that identical queries wait for. Its outcome is set once."""

    __slots__ = ("answer", "done", "entry", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: bytes | None = None  # the upstream's answer, as it came
        self.entry: CachedAnswer | None = None  # the answer as stored, if it could be
        self.error: UpstreamError | None = None  # kept through errors.fresh

    def finish(self, answer: bytes, entry: CachedAnswer | None) -> None:
        self.answer, self.entry = answer, entry
        self.done.set()

    def fail(self, error: UpstreamError | None) -> None:
        """The query failed (``error``) or was given up (``None``: its task was cancelled)."""
        self.error = None if error is None else fresh(error)
        self.done.set()


class Resolver:
    """Answers queries from the cache or the upstream groups (see the module's docstring).

    ``group`` is the default upstream group; ``routes`` says which group a query goes to, or
    that it is answered here (by default: the built-in local zones and the hosts file that
    ``config`` names, everything else to ``group``).

    Resource handling: background refreshes run in ``nursery`` (see :func:`open_resolver`),
    each under its own deadline of ``--timeout``; nothing here outlives it.
    """

    def __init__(
        self,
        group: UpstreamGroup,
        config: Config,
        nursery: trio.Nursery,
        cache: AnswerCache | None,
        *,
        routes: Routes | None = None,
    ) -> None:
        self._nursery = nursery
        self._flights: dict[bytes, _Flight] = {}
        self._refreshes = 0
        self.routes = routes or Routes(config, Target(group), cache=cache, hosts=config.hosts_table)
        self.reconfigure(config, group, cache)

    def reconfigure(self, config: Config, group: UpstreamGroup, cache: AnswerCache | None) -> None:
        """Answer from now on with ``config``'s settings, ``group`` and ``cache`` (a reload);
        queries already under way finish with what they started with."""
        self.cache = cache
        # Names outside every --forward zone go to the new group (the router holds the target,
        # not the group); newly listed hosts names are dropped from the cache in use.
        self.routes.default.group = group
        self.routes.cache = cache
        self._padding = config.padding
        # RFC 7871 §11.1: a client's subnet is removed on the way out unless --keep-ecs.
        self._strip_ecs = not config.keep_ecs
        self._timeout = config.timeout
        # RFC 8767's timer, or less when --timeout is shorter, so that the stale answer still
        # goes out within the query's own deadline.
        self._stale_after = min(CLIENT_RESPONSE_TIMER, config.timeout * 0.9)
        # Remembered answers point into the cache they came from: none outlive a change of it.
        self._repeats: tuple[dict[bytes, _Repeat], dict[bytes, _Repeat]] = ({}, {})  # TCP, UDP

    @property
    def group(self) -> UpstreamGroup:
        """The default upstream group: where names outside every ``--forward`` zone go."""
        return self.routes.default.group

    # --- the fast path: where the query is read ------------------------------------------

    def answer_repeated(self, data: bytes, now: float, *, udp: bool) -> bytes | None:
        """The cached answer to a query sent in these very bytes (but for the ID) within the
        same second, as it went out then; else ``None``. Never awaits.

        Not for a query due for prefetch (the full path starts the refresh).
        """
        repeats = self._repeats[udp]
        if not repeats:  # the cache is off, or has answered nothing yet
            return None
        repeat = repeats.get(data[2:])
        if repeat is None:
            return None
        entry = repeat.entry
        if entry.gone or now >= entry.prefetch_at or int(now - entry.stored) != repeat.age:
            return None
        cache = self.cache
        assert cache is not None
        cache.hits += 1
        cache.touch(repeat.key)
        return data[:2] + repeat.reply

    def answer_from_cache(
        self, data: bytes, query: Query, now: float, *, udp: bool
    ) -> bytes | None:
        """A fresh cached answer for ``query``, as its client must see it; else ``None``.

        Never awaits: the serve loops call it before they spawn anything. A hit in the last
        tenth of its TTL starts a background refresh (``data`` is the client's query, sent
        upstream as any miss would be).
        """
        cache = self.cache
        if cache is None:
            return None
        key = cache_key(query, ecs_stripped=self._strip_ecs)
        if key is None:
            return None
        entry = cache.get(key, now)
        if entry is None or now >= entry.expires:
            return None
        cache.hits += 1
        if now >= entry.prefetch_at and not entry.refreshing:
            route = self.routes.route(query.question_key)
            if isinstance(route, Forward):
                self._start_refresh(key, data, query, entry, route.target)
        answer = entry.for_client(query, now)
        if udp:
            answer = truncate_for_udp(answer, query.udp_limit)
        repeats = self._repeats[udp]
        if len(repeats) >= REPEATS:
            repeats.clear()  # a flood of distinct queries: start afresh, memory stays bounded
        repeats[data[2:]] = _Repeat(key, entry, int(now - entry.stored), answer[2:])
        return answer

    # --- the task path -------------------------------------------------------------------

    async def resolve(
        self, data: bytes, query: Query, *, udp: bool, target: Target | None = None
    ) -> bytes:
        """The answer to ``query`` as its client must see it (its ID and question, and cut to
        its UDP size when ``udp``), from ``target``'s upstreams (by default the default ones).

        Runs under the caller's deadline. Error handling: raises :class:`UpstreamError` when
        the upstreams failed and no stale answer may stand in; an upstream's SERVFAIL or
        REFUSED answer is returned as it came (never stored).
        """
        target = target or self.routes.default
        cache = self.cache
        key = None if cache is None else cache_key(query, ecs_stripped=self._strip_ecs)
        if cache is None or key is None:
            # Straight to the upstreams: no coroutine of ours between here and the group's.
            outgoing = self._outgoing(data, query, target)
            answer = self._for_client(
                await target.group.resolve(outgoing, query.question_key), query
            )
        else:
            cache.misses += 1
            answer = await self._through_cache(cache, key, data, query, target)
        return truncate_for_udp(answer, query.udp_limit) if udp else answer

    async def _through_cache(
        self, cache: AnswerCache, key: bytes, data: bytes, query: Query, target: Target
    ) -> bytes:
        """A cache miss: a fresh entry stored meanwhile, a stale one, another query's flight
        for the same key, or this query's own."""
        while True:
            now = trio.current_time()
            entry = cache.get(key, now)
            if entry is not None:
                if now < entry.expires:  # stored while this query waited for its task
                    return entry.for_client(query, now)
                return await self._stale_or_fresh(key, entry, data, query, target)
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, data, query, target)
            await flight.done.wait()
            if flight.error is not None:
                raise fresh(flight.error)
            if flight.answer is not None:
                return self._from_flight(flight, query)
            # The query that asked was cancelled (its client left): ask again, if there is
            # time left in this query's own deadline.

    async def _lead(self, key: bytes, data: bytes, query: Query, target: Target) -> bytes:
        flight = self._flights[key] = _Flight()
        generation = self.routes.generation
        try:
            answer = await target.group.resolve(
                self._outgoing(data, query, target), query.question_key
            )
        except UpstreamError as exc:
            flight.fail(exc)
            raise
        except BaseException:
            flight.fail(None)
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        entry = self._store(key, answer, query, generation)
        flight.finish(answer, entry)
        return self._for_client(answer, query)

    async def _stale_or_fresh(
        self, key: bytes, entry: CachedAnswer, data: bytes, query: Query, target: Target
    ) -> bytes:
        # RFC 8767: ask the upstreams, but give the client the stale answer when they fail or
        # have not answered within the client response timer; the refresh goes on regardless.
        now = trio.current_time()
        flight = self._flights.get(key)
        if flight is None and now >= entry.retry_at:
            flight = self._start_refresh(key, data, query, entry, target)
        if flight is not None:
            with trio.move_on_after(self._stale_after):
                await flight.done.wait()
            if flight.answer is not None and flight.answer[3] & 0x0F not in _SOFT_FAILURES:
                return self._from_flight(flight, query)
        assert self.cache is not None
        self.cache.stale_answers += 1
        return entry.for_client(query, trio.current_time(), stale=True)

    def _start_refresh(
        self, key: bytes, data: bytes, query: Query, entry: CachedAnswer, target: Target
    ) -> _Flight | None:
        """Refresh ``key`` in the background; the flight to wait on, or None if at the bound."""
        if self._refreshes >= MAX_REFRESHES or key in self._flights:
            return self._flights.get(key)
        flight = self._flights[key] = _Flight()
        entry.refreshing = True
        self._refreshes += 1
        refresh = partial(
            self._refresh, key, data, query, target=target, entry=entry, flight=flight
        )
        self._nursery.start_soon(refresh)
        return flight

    async def _refresh(
        self,
        key: bytes,
        data: bytes,
        query: Query,
        *,
        target: Target,
        entry: CachedAnswer,
        flight: _Flight,
    ) -> None:
        generation = self.routes.generation
        try:
            with trio.move_on_after(self._timeout):
                answer = await target.group.resolve(
                    self._outgoing(data, query, target), query.question_key
                )
                stored = self._store(key, answer, query, generation)
                if stored is None and answer[3] & 0x0F in _SOFT_FAILURES:
                    entry.retry_at = trio.current_time() + FAILURE_RECHECK
                flight.finish(answer, stored)
                return
            entry.retry_at = trio.current_time() + FAILURE_RECHECK
            flight.fail(UpstreamError(f"no answer within {self._timeout:g} s"))
        except UpstreamError as exc:
            log.debug("refresh failed: %s", exc)
            entry.retry_at = trio.current_time() + FAILURE_RECHECK
            flight.fail(exc)
        finally:
            if not flight.done.is_set():
                flight.fail(None)
            entry.refreshing = False
            self._refreshes -= 1
            if self._flights.get(key) is flight:
                del self._flights[key]

    # --- the wire between the client and the upstreams ------------------------------------

    def _store(
        self, key: bytes, answer: bytes, query: Query, generation: int
    ) -> CachedAnswer | None:
        """Keep an upstream's answer if the cache may; not if the hosts file was read again
        since it was asked for (the name may be the file's now, and the file answers it)."""
        if self.cache is None or generation != self.routes.generation:
            return None
        now = trio.current_time()
        return self.cache.put(key, answer, HEADER_SIZE + len(query.question), now)

    def _outgoing(self, data: bytes, query: Query, target: Target) -> bytes:
        """The query as ``target``'s upstreams get it: without ECS unless kept, padded on an
        encrypted hop."""
        if self._strip_ecs and query.opt is not None:  # only a query with EDNS carries ECS
            data = strip_ecs(data)
        if self._padding and target.encrypted:
            # RFC 8467 §4.1: padded on the encrypted hop (never to a plain: resolver).
            data = pad_query(data, question_end=HEADER_SIZE + len(query.question))[0]
        return data

    def _from_flight(self, flight: _Flight, query: Query) -> bytes:
        if flight.entry is not None:
            return flight.entry.for_client(query, trio.current_time())
        assert flight.answer is not None
        return self._for_client(flight.answer, query)

    def _for_client(self, answer: bytes, query: Query) -> bytes:
        """The upstream's answer with the client's ID and question, padding stripped.

        RFC 7830 §6 / RFC 8467: padding is for the encrypted hop only; an OPT record the client
        did not send (we added it to pad) is not its either (RFC 6891 §7). The question is the
        client's byte for byte: an answer shared by coalesced queries carries the first one's
        letter case.
        """
        question = query.question
        question_end = HEADER_SIZE + len(question)
        # The ECS option of an answer, with --keep-ecs off, goes in the same walk (RFC 7871
        # §7.2.1: it is about our query, which carried none, not the client's).
        answer = strip_padding(
            answer, remove_opt=query.opt is None, question_end=question_end, ecs=self._strip_ecs
        )
        if answer[HEADER_SIZE:question_end] == question:
            return query.id.to_bytes(2, "big") + answer[2:]
        return (
            query.id.to_bytes(2, "big") + answer[2:HEADER_SIZE] + question + answer[question_end:]
        )


@asynccontextmanager
async def open_resolver(config: Config) -> AsyncIterator[Resolver]:
    """Open the upstream groups (the default one and one per ``--forward`` zone) and a
    resolver over them, with the cache ``config`` asks for, the built-in local zones and the
    hosts file (read now unless ``config`` holds its table already, then watched for changes).

    Error handling: raises :class:`~dot_proxy.errors.ConfigError` when the hosts file must be
    read now and cannot be. Resource handling: the background refreshes' nursery (and the
    hosts file's watch) is cancelled on exit, before the upstreams close.
    """
    cache = cache_for(config)
    async with open_registry() as registry, trio.open_nursery() as nursery:
        default, forwards = await open_targets(registry, config)
        routes = await start_routes(config, default, forwards, cache=cache, nursery=nursery)
        try:
            yield Resolver(default.group, config, nursery, cache, routes=routes)
        finally:
            nursery.cancel_scope.cancel()


def cache_for(config: Config) -> AnswerCache | None:
    """The answer cache ``config`` asks for, or None when ``--cache-size`` is 0."""
    if not config.cache_size:
        return None
    return AnswerCache(
        size=config.cache_size,
        min_ttl=config.cache_min_ttl,
        max_ttl=config.cache_max_ttl,
        serve_stale=config.serve_stale,
    )
