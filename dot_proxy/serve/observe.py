"""Read the counters a running server keeps into a metrics :class:`Snapshot`, at scrape time.

Nothing here runs on the query path: the serve loops, the cache and the upstreams' health
records count as they go (plain integer additions), and a scrape reads them. Every metric and
every label value that can be known in advance is in the snapshot from the first scrape, with
zeros where nothing happened yet, so that an alert on a missing series means a fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import ProcessCollector

from dot_proxy import __version__
from dot_proxy.core.health import Health
from dot_proxy.core.metrics import Histogram, Snapshot

if TYPE_CHECKING:
    from dot_proxy.serve.running import Running

__all__ = ["ProcessReader", "snapshot", "upstream_counts"]

#: RFC 1035 §4.1.1 and RFC 2136 §2.2 names of the header's 4-bit RCODE.
RCODE_NAMES: Final = (
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    *(f"RCODE{code}" for code in range(11, 16)),
)
#: Always exposed; the others once they have been sent.
COMMON_RCODES: Final = 6
TRANSPORTS: Final = ("udp", "tcp")
UPSTREAM_FAILURES: Final = ("timeout", "error", "rcode")


class ProcessReader:
    """The standard ``process_*`` values of this process, from /proc (prometheus_client's)."""

    def __init__(self) -> None:
        self._collector = ProcessCollector(registry=None)

    def read(self, into: Snapshot) -> None:
        for family in self._collector.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            for sample in family.samples:
                if sample.name == name:
                    into.set(name, float(sample.value))


def snapshot(running: Running, process: ProcessReader | None = None) -> Snapshot:
    """Every metric of ``running`` now (and of this process, given ``process``)."""
    taken = Snapshot()
    taken.set("dot_proxy_build_info", 1.0, __version__)
    _serving(running, taken)
    _cache(running, taken)
    for spec in running.config.upstreams:
        _zero_upstream(taken, spec.label)
    upstreams = running.upstreams
    hedges = running.retired_hedges + sum(group.hedges_started for group in running.groups)
    taken = upstream_counts([(label, health) for label, health, _ in upstreams], hedges, into=taken)
    for label, health, connections in upstreams:
        # Summed over the upstreams that share a label (one spec with two sets of pins).
        up = taken.get("dot_proxy_upstream_up", label) or 0.0
        assert isinstance(up, float)
        taken.set("dot_proxy_upstream_up", max(up, 0.0 if health.down else 1.0), label)
        open_now = taken.get("dot_proxy_upstream_connections", label) or 0.0
        assert isinstance(open_now, float)
        taken.set("dot_proxy_upstream_connections", open_now + len(connections), label)
    for result, count in running.reloads.items():
        taken.set("dot_proxy_config_reloads_total", float(count), result)
    if process is not None:
        process.read(taken)
    return taken


def _serving(running: Running, taken: Snapshot) -> None:
    stats = running.stats
    taken.set("dot_proxy_queries_total", float(stats.queries_udp), "udp")
    taken.set("dot_proxy_queries_total", float(stats.queries_tcp), "tcp")
    for code, count in enumerate(stats.rcodes):
        if count or code < COMMON_RCODES:
            taken.set("dot_proxy_responses_total", float(count), RCODE_NAMES[code])
    for reason, count in (
        ("malformed", stats.malformed),
        ("refused", stats.refused),
        ("ratelimited", stats.ratelimited),
        ("busy", stats.dropped_busy),
    ):
        taken.set("dot_proxy_dropped_total", float(count), reason)
    duration = stats.query_duration
    taken.set("dot_proxy_query_duration_seconds", Histogram(duration.counts, duration.sum))
    listening = running.listening
    in_flight = tcp = 0
    if listening is not None:
        in_flight = running.config.max_in_flight - listening.limiter.value
        tcp = running.tcp_connections
    taken.set("dot_proxy_queries_in_flight", float(in_flight))
    taken.set("dot_proxy_tcp_connections", float(tcp))


def _cache(running: Running, taken: Snapshot) -> None:
    cache = running.cache
    for name, value in (
        ("dot_proxy_cache_hits_total", 0 if cache is None else cache.hits),
        ("dot_proxy_cache_misses_total", 0 if cache is None else cache.misses),
        ("dot_proxy_cache_stale_answers_total", 0 if cache is None else cache.stale_answers),
        ("dot_proxy_cache_evictions_total", 0 if cache is None else cache.evictions),
        (
            "dot_proxy_cache_entries",
            0 if cache is None or running.resolver.cache is None else len(cache),
        ),
    ):
        taken.set(name, float(value))


def _zero_upstream(taken: Snapshot, label: str) -> None:
    taken.set("dot_proxy_upstream_queries_total", 0.0, label)
    for reason in UPSTREAM_FAILURES:
        taken.set("dot_proxy_upstream_failures_total", 0.0, label, reason)
    taken.set("dot_proxy_upstream_up", 0.0, label)
    taken.set("dot_proxy_upstream_rtt_seconds", Histogram(), label)
    taken.set("dot_proxy_upstream_connections", 0.0, label)


def upstream_counts(
    upstreams: Iterable[tuple[str, Health]], hedges: int, *, into: Snapshot
) -> Snapshot:
    """``into`` plus what was counted: each upstream's queries, failures and answer times
    (from its health record, by label), and ``hedges`` (the counters, not the gauges), as a
    new snapshot."""
    counted = Snapshot({name: dict(series) for name, series in into.values.items()})
    hedged = counted.get("dot_proxy_hedged_queries_total") or 0.0
    assert isinstance(hedged, float)
    for label, health in upstreams:
        failures = {
            "timeout": health.timeouts,
            "error": health.failures - health.timeouts,
            "rcode": health.soft_failures,
        }
        queries = health.answers + health.failures + health.soft_failures + health.lost_races
        _add(counted, "dot_proxy_upstream_queries_total", float(queries), label)
        for reason, count in failures.items():
            _add(counted, "dot_proxy_upstream_failures_total", float(count), label, reason)
        rtt = health.rtt_histogram
        _add(counted, "dot_proxy_upstream_rtt_seconds", Histogram(rtt.counts, rtt.sum), label)
    counted.set("dot_proxy_hedged_queries_total", hedged + hedges)
    return counted


def _add(taken: Snapshot, name: str, value: float | Histogram, *labels: str) -> None:
    old = taken.get(name, *labels)
    if old is None:
        taken.set(name, value, *labels)
    elif isinstance(old, Histogram) and isinstance(value, Histogram):
        taken.set(name, old.plus(value), *labels)
    else:
        assert isinstance(old, float) and isinstance(value, float)
        taken.set(name, old + value, *labels)
