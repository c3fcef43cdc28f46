"""The running server's state that a reload changes, and the one place that changes it.

:class:`Running` holds what the serve loops, the handler and the resolver read: the resolver
(cache and upstream group), the access list, the rate limit, the deadlines, and the counters.
:meth:`Running.apply` takes a reloaded :class:`Config` and pushes it into those objects, with
no await between the changes that queries see, so a query meets either the old settings or
the new ones, never half of each:

- the access list, the rate limit and the TCP idle time go into :class:`Listening` (the serve
  loops read them per burst, per query, per connection);
- the deadline into the handler and the resolver;
- the cache keeps its answers and takes the new bounds (``AnswerCache.resize``); turned off,
  it is kept aside (its counters still count), turned on again, reused;
- upstream settings that changed open a new upstream group with new connections (and one per
  ``--forward`` zone), which new queries use at once; queries in flight on the old groups
  finish there (each within the old deadline), and then their connections close. The old
  groups' counters are kept (:attr:`Running.retired`), so no per-upstream counter goes back.

Settings that a running process cannot take (the sockets are bound, the workers forked, the
user dropped to) are the caller's to refuse: see ``cli``'s reload.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from dot_proxy.config import Config, PlainSpec, UpstreamSpec
from dot_proxy.core.access import AccessList, RateLimiter
from dot_proxy.core.cache import AnswerCache
from dot_proxy.core.metrics import Snapshot
from dot_proxy.handler import QueryHandler, ServerStats
from dot_proxy.resolver import Resolver, cache_for
from dot_proxy.routing import Target, start_routes
from dot_proxy.serve.listening import Listening
from dot_proxy.serve.observe import upstream_counts
from dot_proxy.upstream.group import UpstreamGroup, open_upstream_group

__all__ = ["UPSTREAM_SETTINGS", "Running", "open_running"]

log = logging.getLogger(__name__)

#: The settings the upstream group and its pools read: a change to any opens a new group.
UPSTREAM_SETTINGS = (
    "upstreams",
    "ca_data",
    "timeout",
    "max_connections",
    "max_pipeline",
    "upstream_idle_timeout",
    "upstream_policy",
    "hedge_after",
)


@dataclass(slots=True)
class _Hosted:
    """An upstream group alive in the groups' nursery, and the scope that closes it."""

    group: UpstreamGroup
    scope: trio.CancelScope


class Running:
    """See the module's docstring. Build with :func:`open_running`."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        stats: ServerStats,
        groups_nursery: trio.Nursery | None,
        hosted: Sequence[_Hosted] = (),
    ) -> None:
        self.config = config
        self.stats = stats
        self.resolver = resolver
        self.handler = QueryHandler(resolver, config, stats)
        self.access = AccessList(config.allow)
        self.ratelimit = RateLimiter(config.ratelimit) if config.ratelimit else None
        self.listening: Listening | None = None
        self._tcp_listeners = 0
        self.reloads = {"success": 0, "error": 0}
        # Counts of upstream groups closed after a reload, carried so counters never go back.
        self.retired = Snapshot()
        self._cache = resolver.cache  # kept when a reload turns the cache off
        self._groups_nursery = groups_nursery
        self._hosted = list(hosted)  # the default group first, then the zones'

    @property
    def cache(self) -> AnswerCache | None:
        """The answer cache, in use or set aside by a reload (its counters still count)."""
        return self._cache

    @property
    def groups(self) -> Sequence[UpstreamGroup]:
        """The upstream group in use first, then any still finishing queries after a reload."""
        current = self.resolver.group
        return [current, *(h.group for h in self._hosted if h.group is not current)]

    def ready(self) -> bool:
        """Whether an upstream of the group in use is usable (not marked down)."""
        return any(not health.down for health in self.resolver.group.health)

    def listen(self, work: trio.Nursery, sockets: Sequence[socket.socket]) -> Listening:
        """What the serve loops on ``sockets`` share, for tasks in ``work``; a reload changes
        it in place."""
        config = self.config
        self._tcp_listeners = sum(sock.type == socket.SOCK_STREAM for sock in sockets)
        self.listening = Listening(
            handler=self.handler,
            nursery=work,
            limiter=trio.Semaphore(config.max_in_flight),
            tcp_clients=trio.Semaphore(config.max_tcp_clients),
            stats=self.stats,
            access=self.access,
            ratelimit=self.ratelimit,
            tcp_idle_timeout=config.tcp_idle_timeout,
        )
        return self.listening

    @property
    def tcp_connections(self) -> int:
        """Client TCP connections open now."""
        if self.listening is None:
            return 0
        # Each TCP serve loop holds a slot while it waits to accept (serve/tcp.py).
        held = self.config.max_tcp_clients - self.listening.tcp_clients.value
        return max(0, held - self._tcp_listeners)

    async def apply(self, new: Config) -> None:
        """Serve from now on with ``new`` (already validated; restart-only settings are the
        caller's to keep). A new upstream group, if one is needed, is opened first: its
        connections then open on demand, and no query waits for the swap."""
        old = self.config
        group = self.resolver.group
        zones: list[tuple[Target, UpstreamGroup]] = []
        if any(getattr(old, name) != getattr(new, name) for name in UPSTREAM_SETTINGS):
            if self._groups_nursery is None:
                log.warning("upstream settings were not reloaded: this resolver is not ours")
            else:
                group = await self._open_group(new)
                self._groups_nursery.start_soon(self._retire, self.resolver.group, old.timeout)
                # Each --forward zone's group takes the new settings too (its zone and
                # upstreams stay: --forward takes a restart).
                forwards = self.resolver.routes.forwards
                for forward in new.forward:
                    target = forwards[forward.zone]
                    zones.append((target, await self._open_group(new, forward.targets)))
                    self._groups_nursery.start_soon(self._retire, target.group, old.timeout)
        # From here to the end nothing awaits: queries see the old settings or the new.
        for target, zone_group in zones:
            target.group = zone_group
        self.config = new
        self.resolver.reconfigure(new, group, self._cache_for(new))
        self.handler.reconfigure(new)
        if new.allow != old.allow:
            self.access = AccessList(new.allow)
        if new.ratelimit != old.ratelimit:
            self.ratelimit = RateLimiter(new.ratelimit) if new.ratelimit else None
        if self.listening is not None:
            self.listening.access = self.access
            self.listening.ratelimit = self.ratelimit
            self.listening.tcp_idle_timeout = new.tcp_idle_timeout

    def _cache_for(self, config: Config) -> AnswerCache | None:
        cache = self._cache
        if not config.cache_size:
            if cache is not None:
                # Off: its answers go, its counters stay readable; kept for a later reload.
                cache.resize(1, min_ttl=0, max_ttl=cache.max_ttl, serve_stale=0.0)
            return None
        if cache is None:
            self._cache = cache_for(config)
            return self._cache
        cache.resize(
            config.cache_size,
            min_ttl=config.cache_min_ttl,
            max_ttl=config.cache_max_ttl,
            serve_stale=config.serve_stale,
        )
        return cache

    async def _open_group(
        self, config: Config, specs: Sequence[UpstreamSpec | PlainSpec] | None = None
    ) -> UpstreamGroup:
        assert self._groups_nursery is not None
        host = partial(_host_group, config, specs=specs)
        hosted: _Hosted = await self._groups_nursery.start(host)
        self._hosted.append(hosted)
        return hosted.group

    async def _retire(self, group: UpstreamGroup, drain: float) -> None:
        # Every query that could still be on the old group started before the swap, under a
        # deadline of at most the old timeout: after that long, nothing is left to finish.
        await trio.sleep(drain)
        hosted = next(h for h in self._hosted if h.group is group)
        # Fold its counts into `retired` and drop it from the live groups in one step (no
        # await between), so a scrape sees them in one place or the other, never both.
        self.retired = upstream_counts([group], into=self.retired)
        self._hosted.remove(hosted)
        hosted.scope.cancel()
        log.debug("closed the upstream connections of the previous configuration")


async def _host_group(
    config: Config,
    *,
    specs: Sequence[UpstreamSpec | PlainSpec] | None = None,
    task_status: trio.TaskStatus[_Hosted] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        async with open_upstream_group(config, specs=specs) as group:
            task_status.started(_Hosted(group, scope))
            await trio.sleep_forever()


@asynccontextmanager
async def open_running(
    config: Config, *, stats: ServerStats | None = None, resolver: Resolver | None = None
) -> AsyncIterator[Running]:
    """The state of a server about to serve ``config``: the cache and the upstream group
    opened (or ``resolver``, opened by the caller, who then keeps its upstreams: a reload
    cannot change them).

    Resource handling: on exit the resolver's background refreshes are cancelled, then every
    upstream group's connections closed.
    """
    stats = stats if stats is not None else ServerStats()
    if resolver is not None:
        yield Running(config, resolver, stats, None)
        return
    async with trio.open_nursery() as groups:
        try:
            hosted: _Hosted = await groups.start(_host_group, config)
            zones = [hosted]
            forwards: dict[bytes, Target] = {}
            for forward in config.forward:
                zone: _Hosted = await groups.start(
                    partial(_host_group, config, specs=forward.targets)
                )
                zones.append(zone)
                forwards[forward.zone] = Target(zone.group, encrypted=not forward.cleartext)
            async with trio.open_nursery() as refreshes:
                try:
                    cache = cache_for(config)
                    routes = await start_routes(
                        config, Target(hosted.group), forwards, cache=cache, nursery=refreshes
                    )
                    answering = Resolver(hosted.group, config, refreshes, cache, routes=routes)
                    yield Running(config, answering, stats, groups, zones)
                finally:
                    refreshes.cancel_scope.cancel()
        finally:
            groups.cancel_scope.cancel()
