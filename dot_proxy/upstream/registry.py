"""The upstream pools and health records that outlive a reload's groups.

A reload that changes any upstream setting builds new :class:`UpstreamGroup` objects (a group
is only policy: order, hedging, probing). The pools and the health records under them are
kept here and shared by every group that lists their upstream, so a reload keeps what it did
not change:

- a **pool** (its open TLS connections, its resumable sessions) is keyed by the upstream and
  the settings its connections read (:func:`pool_key`): an upstream whose spec and those
  settings did not change keeps its warm connections; a new or changed one gets a new pool,
  whose connections open on demand;
- a **health record** (latency, failures, backoff, and the counters the metrics read) is keyed
  by the upstream alone: what was learnt about a resolver stays true when only the pool's
  settings changed, and its counters never go back.

A group retired after a reload (:meth:`UpstreamRegistry.retire`) releases what it held: a pool
no live group lists any more closes (the queries it carried have finished by then), and a
health record no live group lists is dropped (the upstream is gone from the configuration,
and so are its metrics' series).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from dot_proxy.config import Config, PlainSpec, UpstreamSpec
from dot_proxy.core.health import Health
from dot_proxy.upstream.group import Member, UpstreamGroup, run_upstream_group
from dot_proxy.upstream.pool import Connect, default_connector, open_member

__all__ = ["UpstreamRegistry", "open_registry", "pool_changes", "pool_key"]

log = logging.getLogger(__name__)

Spec = UpstreamSpec | PlainSpec


def pool_key(spec: Spec, config: Config) -> Hashable:
    """What a pool for ``spec`` is made from: the upstream, the trusted CAs, and every setting
    its connections read (:class:`~dot_proxy.upstream.connection.Connection`). Two equal keys
    may share one pool."""
    if isinstance(spec, PlainSpec):
        return spec  # a socket per query: nothing of the configuration shapes it
    return (
        spec,
        config.ca_file,
        config.ca_data,
        config.max_connections,
        config.max_pipeline,
        config.connect_timeout,
        config.stall_timeout,
        config.timeout,
        config.upstream_idle_timeout,
    )


def pool_changes(old: Config, new: Config) -> str:
    """What a reload from ``old`` to ``new`` does to the pools, for the log: whose connections
    are kept, who gets new ones, whose close once their queries are done."""
    before, after = _pools_of(old), _pools_of(new)
    parts = [
        (what, sorted({after.get(key) or before[key] for key in keys}))
        for what, keys in (
            ("connections kept", after.keys() & before.keys()),
            ("new connections", after.keys() - before.keys()),
            ("closing once their queries are done", before.keys() - after.keys()),
        )
    ]
    return "; ".join(f"{what}: {', '.join(labels)}" for what, labels in parts if labels)


def _pools_of(config: Config) -> dict[Hashable, str]:
    specs = [*config.upstreams, *(spec for forward in config.forward for spec in forward.targets)]
    return {pool_key(spec, config): spec.label for spec in specs}


@dataclass(slots=True)
class _Pool:
    """A pool kept while groups list it: how many do, and the scope that closes it."""

    spec: Spec
    member: Member
    scope: trio.CancelScope
    users: int = 0


@dataclass(slots=True)
class _Record:
    """A health record kept while groups list its upstream."""

    health: Health = field(default_factory=Health)
    users: int = 0


@dataclass(slots=True)
class _Hosted:
    """A live group, the keys of what it holds, and the scope that ends its background tasks."""

    group: UpstreamGroup
    scope: trio.CancelScope
    pools: tuple[Hashable, ...]
    specs: tuple[Spec, ...]


class UpstreamRegistry:
    """The live groups, and the pools and health records they share. Build with
    :func:`open_registry`.

    Resource handling: every pool and every group's background tasks run in ``nursery``, each
    under its own scope; a pool closes when the last group listing it is retired.
    """

    def __init__(self, nursery: trio.Nursery, connect: Connect | None) -> None:
        self._nursery = nursery
        self._connect = connect  # None: a TLS connector per set of trusted CAs
        self._connectors: dict[tuple[str | None, str | None], Connect] = {}
        self._pools: dict[Hashable, _Pool] = {}
        self._health: dict[Spec, _Record] = {}
        self._groups: list[_Hosted] = []

    @property
    def groups(self) -> Sequence[UpstreamGroup]:
        """The live groups, oldest first."""
        return [hosted.group for hosted in self._groups]

    @property
    def upstreams(self) -> list[tuple[str, Health, Sequence[object]]]:
        """Each upstream a live group lists: its label, its health record, and the connections
        of its pools (more than one pool while a changed upstream's old one drains)."""
        connections: dict[Spec, list[object]] = {spec: [] for spec in self._health}
        for pool in self._pools.values():
            connections[pool.spec].extend(pool.member.connections)
        return [
            (spec.label, record.health, connections[spec]) for spec, record in self._health.items()
        ]

    async def open_group(
        self, config: Config, specs: Sequence[Spec] | None = None
    ) -> UpstreamGroup:
        """A group over ``specs`` (default ``config.upstreams``), on the pools and health
        records already here where they fit, new ones where not."""
        specs = tuple(config.upstreams if specs is None else specs)
        keys = tuple(pool_key(spec, config) for spec in specs)
        members = [
            await self._pool(spec, key, config) for spec, key in zip(specs, keys, strict=True)
        ]
        health = [self._health_of(spec) for spec in specs]
        hosted: _Hosted = await self._nursery.start(
            self._host_group, config, members, health, keys, specs
        )
        self._groups.append(hosted)
        return hosted.group

    def retire(self, group: UpstreamGroup) -> None:
        """End ``group``'s background tasks and release what it held. Call it once no query
        can still be in the group (after the old deadline)."""
        hosted = next(h for h in self._groups if h.group is group)
        self._groups.remove(hosted)
        hosted.scope.cancel()
        for key in hosted.pools:
            pool = self._pools[key]
            pool.users -= 1
            if not pool.users:
                del self._pools[key]
                pool.scope.cancel()
        for spec in hosted.specs:
            record = self._health[spec]
            record.users -= 1
            if not record.users:
                del self._health[spec]  # the upstream is gone: so are its series

    async def _pool(self, spec: Spec, key: Hashable, config: Config) -> Member:
        pool = self._pools.get(key)
        if pool is None:
            connect = self._connector(config)
            member, scope = await self._nursery.start(_host_pool, spec, config, connect)
            pool = self._pools[key] = _Pool(spec, member, scope)
        pool.users += 1
        return pool.member

    def _health_of(self, spec: Spec) -> Health:
        record = self._health.setdefault(spec, _Record())
        record.users += 1
        return record.health

    def _connector(self, config: Config) -> Connect:
        if self._connect is not None:
            return self._connect
        cas = (config.ca_file, config.ca_data)
        if cas not in self._connectors:
            # One per set of trusted CAs: its TLS sessions are resumed across pools.
            self._connectors[cas] = default_connector(config, warn=not self._connectors)
        return self._connectors[cas]

    async def _host_group(
        self,
        config: Config,
        members: Sequence[Member],
        health: Sequence[Health],
        keys: tuple[Hashable, ...],
        specs: tuple[Spec, ...],
        *,
        task_status: trio.TaskStatus[_Hosted] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            async with run_upstream_group(members, config, health=health) as group:
                task_status.started(_Hosted(group, scope, keys, specs))
                await trio.sleep_forever()


async def _host_pool(
    spec: Spec,
    config: Config,
    connect: Connect,
    *,
    task_status: trio.TaskStatus[tuple[Member, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        async with open_member(spec, config, connect=connect) as member:
            task_status.started((member, scope))
            await trio.sleep_forever()
    log.debug("closed the pool of %s", spec.label)


@asynccontextmanager
async def open_registry(*, connect: Connect | None = None) -> AsyncIterator[UpstreamRegistry]:
    """A registry whose pools and groups live until exit (``connect``: see
    :func:`~dot_proxy.upstream.pool.open_upstreams`).

    Resource handling: on exit every group's tasks and every pool's connections are cancelled.
    """
    async with trio.open_nursery() as nursery:
        try:
            yield UpstreamRegistry(nursery, connect)
        finally:
            nursery.cancel_scope.cancel()
