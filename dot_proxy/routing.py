"""Where each query goes: answered here, or forwarded to which upstream group (split DNS).

The decision is :class:`~dot_proxy.core.local_zones.Router`'s (pure): the hosts file, then the
deepest of the ``--forward`` zones and the built-in local zones, else the default upstreams.
This module gives it its targets and keeps it current:

- :func:`open_targets` opens the default upstream group and one group per ``--forward`` zone
  from an :class:`~dot_proxy.upstream.registry.UpstreamRegistry`, each with its failover and
  hedging; a zone's queries are padded
  (RFC 8467) only when its upstreams are reached over TLS, never for a ``plain:`` resolver.
- :class:`Routes` holds the router, and re-reads the hosts file when it changes (polled every
  few seconds by its size, time and inode, as CoreDNS's hosts plugin does) or when asked
  (:meth:`Routes.reload_hosts`, which SIGHUP calls). A reading runs in a thread, the router
  is rebuilt there too, and the new one replaces the old in one assignment: a query sees one
  reading or the other, never half of one. Cached answers for names the file now lists are
  dropped, so the file's answer is what clients get from then on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Final, NamedTuple, NoReturn

import trio

from dot_proxy.config import Config, read_hosts
from dot_proxy.core.cache import AnswerCache
from dot_proxy.core.hosts import HostsProblem, HostsTable
from dot_proxy.core.local_zones import Forward, Local, Router
from dot_proxy.core.message import TYPE_A, TYPE_AAAA, TYPE_PTR
from dot_proxy.errors import ConfigError
from dot_proxy.upstream.group import UpstreamGroup
from dot_proxy.upstream.registry import UpstreamRegistry

__all__ = [
    "HOSTS_POLL_INTERVAL",
    "Routes",
    "Target",
    "hosts_counts",
    "log_hosts",
    "open_targets",
    "start_routes",
]

log = logging.getLogger(__name__)

#: How often the hosts file is looked at for a change (CoreDNS's hosts plugin: 5 s).
HOSTS_POLL_INTERVAL: Final = 5.0
#: Problems of one hosts-file reading logged line by line at most; the rest are counted.
MAX_PROBLEMS_LOGGED: Final = 20

# What tells a new version of the file: its device and inode (an editor or a tool that
# writes a new file and renames it over the old), its size and its modification time.
_Signature = tuple[int, int, int, int]


class Target:
    """Where a forwarded query goes: an upstream group (replaced in place when a reload opens a
    new one, so the router need not be rebuilt), and whether the hop to it is encrypted: only
    then is a query padded (RFC 8467; and not at all with ``--no-padding``)."""

    __slots__ = ("encrypted", "group")

    def __init__(self, group: UpstreamGroup, encrypted: bool = True) -> None:
        self.group = group
        self.encrypted = encrypted


async def open_targets(
    registry: UpstreamRegistry, config: Config
) -> tuple[Target, dict[bytes, Target]]:
    """Open the default upstream group and one per ``--forward`` zone in ``registry``; the
    default target and the zones' (by lower-cased wire name).

    Resource handling: the groups live as long as ``registry``.
    """
    default = Target(await registry.open_group(config))
    forwards: dict[bytes, Target] = {}
    for forward in config.forward:
        group = await registry.open_group(config, forward.targets)
        forwards[forward.zone] = Target(group, encrypted=not forward.cleartext)
    return default, forwards


class _Reading(NamedTuple):
    """One reading of the hosts file, made in a thread: what the swap needs."""

    signature: _Signature | None
    table: HostsTable
    problems: Sequence[HostsProblem]
    router: Router[Target]
    added: frozenset[bytes]  # names listed now that were not before
    counts: tuple[int, int]  # see hosts_counts


class Routes:
    """The router the query path asks (:attr:`router`, replaced whole on each hosts reading),
    and the hosts file behind it.

    ``generation`` counts the readings: an answer asked of the upstreams under one reading is
    not stored in the cache under the next (its name may be the file's now). ``cache`` is the
    answer cache to drop newly listed names from (``None``: no cache; a reload may set it).
    """

    def __init__(
        self,
        config: Config,
        default: Target,
        forwards: Mapping[bytes, Target] | None = None,
        *,
        cache: AnswerCache | None = None,
        hosts: HostsTable | None = None,
    ) -> None:
        self.default = default
        self.forwards = dict(forwards or {})
        self._local_zones = config.local_zones
        self._path = config.hosts_file
        self._where = config.name_of("hosts")
        self.cache = cache
        self._hosts = hosts or HostsTable({})
        self._signature = None if self._path is None else _signature(self._path)
        self._reading = trio.Lock()
        self.generation = 0
        self.router = self._build(hosts)

    def route(self, question_key: bytes) -> Forward[Target] | Local:
        """Where the query with this ``Query.question_key`` goes (see :class:`Router`)."""
        return self.router.route(question_key)

    @property
    def hosts(self) -> HostsTable:
        """The hosts file's table as last read (empty without ``--hosts``)."""
        return self._hosts

    def _build(self, hosts: HostsTable | None) -> Router[Target]:
        return Router(
            default=self.default,
            forwards=self.forwards,
            hosts=hosts,
            local_zones=self._local_zones,
        )

    async def reload_hosts(self) -> bool:
        """Read the hosts file again and answer from what it says now; whether it was read.

        Without ``--hosts`` there is nothing to read (False). A file that cannot be read now
        is logged at WARNING and the last reading stays in use (False). Readings run one at a
        time, each in a thread (a blocklist of a hundred thousand lines takes a moment).
        """
        if self._path is None:
            return False
        async with self._reading:
            try:
                reading = await trio.to_thread.run_sync(self._read, self._path, self._hosts)
            except ConfigError as exc:
                log.warning("%s; still answering from the last reading", exc)
                # Not tried again until the file changes once more (or SIGHUP).
                self._signature = await trio.to_thread.run_sync(_signature, self._path)
                return False
            self.router = reading.router
            self.generation += 1
            self._hosts, self._signature = reading.table, reading.signature
            dropped = 0
            if self.cache is not None and reading.added:
                dropped = self.cache.drop_names(reading.added)
            log_hosts(self._path, reading.counts, reading.problems, reloaded=True)
            if dropped:
                log.info("dropped %d cached answers for names the hosts file now lists", dropped)
            return True

    def _read(self, path: str, old: HostsTable) -> _Reading:
        # In a worker thread: nothing here touches trio or the query path's state. The file's
        # signature is taken before it is read, so a change made while reading is seen next.
        signature = _signature(path)
        table, problems = read_hosts(path, where=self._where)
        added = frozenset(name for name in table.names if name not in old.names)
        return _Reading(signature, table, problems, self._build(table), added, hosts_counts(table))

    async def watch_hosts(self, interval: float = HOSTS_POLL_INTERVAL) -> NoReturn:
        """Re-read the hosts file whenever its signature (inode, size, time) changes."""
        assert self._path is not None
        while True:
            await trio.sleep(interval)
            if await trio.to_thread.run_sync(_signature, self._path) != self._signature:
                await self.reload_hosts()


async def start_routes(
    config: Config,
    default: Target,
    forwards: Mapping[bytes, Target],
    *,
    cache: AnswerCache | None,
    nursery: trio.Nursery,
) -> Routes:
    """The routes for ``config``: the hosts file as ``config`` holds it (read at start) or read
    now, logged; its watch started in ``nursery``.

    Error handling: raises :class:`ConfigError` when the file must be read now and cannot be.
    """
    path = config.hosts_file
    hosts = config.hosts_table
    if path is not None:
        problems: Sequence[HostsProblem] = config.hosts_problems
        if hosts is None:
            read = partial(read_hosts, path, where=config.name_of("hosts"))
            table, problems = await trio.to_thread.run_sync(read)
            hosts = table
        log_hosts(path, hosts_counts(hosts), problems)
    routes = Routes(config, default, forwards, cache=cache, hosts=hosts)
    if path is not None:
        nursery.start_soon(routes.watch_hosts)
    return routes


def _signature(path: str) -> _Signature | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # gone: the read that follows says why
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def hosts_counts(table: HostsTable) -> tuple[int, int]:
    """How many host names (with A or AAAA records) and addresses (PTR) ``table`` answers."""
    names = addresses = 0
    for rrsets in table.names.values():
        types = {rtype for rtype, _ in rrsets}
        names += bool(types & {TYPE_A, TYPE_AAAA})
        addresses += TYPE_PTR in types
    return names, addresses


def log_hosts(
    path: str,
    counts: tuple[int, int],
    problems: Sequence[HostsProblem],
    *,
    reloaded: bool = False,
) -> None:
    """Log a reading of the hosts file: its problems by line (WARNING), and what it holds
    (``counts``: :func:`hosts_counts`)."""
    for problem in problems[:MAX_PROBLEMS_LOGGED]:
        log.warning("hosts file %s %s", path, problem)
    if len(problems) > MAX_PROBLEMS_LOGGED:
        log.warning(
            "hosts file %s: %d more lines skipped", path, len(problems) - MAX_PROBLEMS_LOGGED
        )
    names, addresses = counts
    log.info(
        "hosts file %s %s: %d names and %d addresses answered here%s",
        path,
        "re-read" if reloaded else "read",
        names,
        addresses,
        f", {len(problems)} lines skipped" if problems else "",
    )
