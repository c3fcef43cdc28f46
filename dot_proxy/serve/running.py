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
- upstream settings that changed open a new upstream group (and one per ``--forward`` zone),
  which new queries use at once. The groups are policy only; their pools and health records
  live in the :class:`~dot_proxy.upstream.registry.UpstreamRegistry`, so an upstream whose
  spec and connection settings did not change keeps its connections, and every upstream still
  listed keeps its health and counters. A new or changed upstream gets new connections (on
  demand); queries in flight on the old groups finish there (each within the old deadline),
  and then the pools no group lists any more close. The old groups' hedges are counted on
  (:attr:`Running.retired_hedges`), so no counter goes back.

Settings that a running process cannot take (the sockets are bound, the workers forked, the
user dropped to) are the caller's to refuse: see ``cli``'s reload.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from dot_proxy.config import Config
from dot_proxy.core.access import AccessList, RateLimiter
from dot_proxy.core.cache import AnswerCache
from dot_proxy.core.health import Health
from dot_proxy.handler import QueryHandler, ServerStats
from dot_proxy.resolver import Resolver, cache_for
from dot_proxy.routing import Target, open_targets, start_routes
from dot_proxy.serve.listening import Listening
from dot_proxy.upstream.group import UpstreamGroup
from dot_proxy.upstream.registry import UpstreamRegistry, open_registry, pool_changes

__all__ = ["UPSTREAM_SETTINGS", "Running", "open_running"]

log = logging.getLogger(__name__)

#: The settings the upstream groups and their pools read: a change to any opens new groups
#: (and new pools where the pools' own settings changed: see upstream.registry.pool_key).
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


class Running:
    """See the module's docstring. Build with :func:`open_running`."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        stats: ServerStats,
        registry: UpstreamRegistry | None = None,
        retiring: trio.Nursery | None = None,
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
        # Hedges of the groups retired after a reload, so that counter never goes back (each
        # upstream's own counts live on in its health record, shared by the new groups).
        self.retired_hedges = 0
        self._cache = resolver.cache  # kept when a reload turns the cache off
        self._registry = registry  # None: the resolver's upstreams are its caller's
        self._retiring = retiring  # where old groups wait for their queries to finish

    @property
    def cache(self) -> AnswerCache | None:
        """The answer cache, in use or set aside by a reload (its counters still count)."""
        return self._cache

    @property
    def groups(self) -> Sequence[UpstreamGroup]:
        """The upstream group in use first, then the zones' and any still finishing queries
        after a reload."""
        current = self.resolver.group
        if self._registry is None:
            return [current]
        return [current, *(group for group in self._registry.groups if group is not current)]

    @property
    def upstreams(self) -> list[tuple[str, Health, Sequence[object]]]:
        """Each upstream a live group lists: its label, its health record, its connections."""
        if self._registry is not None:
            return self._registry.upstreams
        group = self.resolver.group
        return [
            (upstream.spec.label, health, upstream.connections)
            for upstream, health in zip(group.upstreams, group.health, strict=True)
        ]

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
            if self._registry is None or self._retiring is None:
                log.warning("upstream settings were not reloaded: this resolver is not ours")
            else:
                group = await self._registry.open_group(new)
                # Each --forward zone's group takes the new settings too (its zone and
                # upstreams stay: --forward takes a restart).
                forwards = self.resolver.routes.forwards
                for forward in new.forward:
                    target = forwards[forward.zone]
                    zones.append((target, await self._registry.open_group(new, forward.targets)))
                old_groups = [self.resolver.group, *(target.group for target, _ in zones)]
                self._retiring.start_soon(self._retire, old_groups, old.timeout)
                log.info("upstreams reloaded: %s", pool_changes(old, new))
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

    async def _retire(self, groups: Sequence[UpstreamGroup], drain: float) -> None:
        # Every query that could still be on the old groups started before the swap, under a
        # deadline of at most the old timeout: after that long, nothing is left to finish.
        await trio.sleep(drain)
        assert self._registry is not None
        for group in groups:
            # No await between: a scrape sees its hedges live or retired, never both.
            self._registry.retire(group)
            self.retired_hedges += group.hedges_started
        log.debug("closed what the previous configuration's upstreams no longer need")


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
        yield Running(config, resolver, stats)
        return
    async with open_registry() as registry, trio.open_nursery() as retiring:
        try:
            default, forwards = await open_targets(registry, config)
            async with trio.open_nursery() as refreshes:
                try:
                    cache = cache_for(config)
                    routes = await start_routes(
                        config, default, forwards, cache=cache, nursery=refreshes
                    )
                    answering = Resolver(default.group, config, refreshes, cache, routes=routes)
                    yield Running(config, answering, stats, registry, retiring)
                finally:
                    refreshes.cancel_scope.cancel()
        finally:
            retiring.cancel_scope.cancel()
