"""The metrics' model, pure: names, histograms, snapshots, and how workers' snapshots add up.

The server keeps plain counters where it already counts (``ServerStats``, the cache, each
upstream's ``Health``); nothing here is on the query path but :meth:`Histogram.observe`. At
scrape time the serve side reads those counters into a :class:`Snapshot`, one value per metric
and label set; with ``--workers`` each worker's snapshot travels through shared memory as bytes
(:meth:`Snapshot.to_bytes`) and the one that answers the scrape adds them up (:func:`merge`).
Rendering to the Prometheus text format is the serve side's (prometheus_client), from
:data:`METRICS`, the public interface: names follow the Prometheus naming guide (base units,
``_total`` for counters), and no label ever holds a query name or a client address.
"""

from __future__ import annotations

import enum
import json
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BUCKETS",
    "METRICS",
    "Histogram",
    "Kind",
    "Merge",
    "MetricSpec",
    "Snapshot",
    "carry",
    "merge",
]

#: Histogram bounds in seconds, CoreDNS's for DNS latency: 0.25 ms doubling to 8.192 s.
BUCKETS: Final = tuple(0.00025 * 2**power for power in range(16))


class Histogram:
    """Counts of observations per bucket of :data:`BUCKETS` (the last: above them all), and
    their sum. ``observe`` is on the query path: one bisection, two additions."""

    __slots__ = ("counts", "sum")

    def __init__(self, counts: Sequence[int] | None = None, total: float = 0.0) -> None:
        self.counts = list(counts) if counts is not None else [0] * (len(BUCKETS) + 1)
        if len(self.counts) != len(BUCKETS) + 1:
            raise ValueError(f"a histogram has {len(BUCKETS) + 1} buckets")
        self.sum = total

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` (seconds) in the first bucket it fits (le)."""
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def observe_many(self, count: int, value: float) -> None:
        """Count ``count`` observations of ``value`` at once."""
        self.counts[bisect_left(BUCKETS, value)] += count
        self.sum += count * value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations at or below it)`` per bucket, ``+Inf`` last, as exposed."""
        running, rows = 0, []
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            rows.append((bound, running))
        return rows

    def plus(self, other: Histogram) -> Histogram:
        """A new histogram holding both ``self``'s and ``other``'s observations."""
        counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        return Histogram(counts, self.sum + other.sum)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.counts == other.counts and self.sum == other.sum

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.sum:g})"


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Merge(enum.Enum):
    """How one metric adds up over workers."""

    SUM = "sum"  # counters, histograms, and gauges of things each worker holds (entries)
    MAX = "max"  # the same fact seen by every worker (build info, reloads: all reload)
    ANY = "any"  # 1 if any worker says 1 (an upstream is up while some worker can use it)
    PER_WORKER = "per_worker"  # not added: each worker's own series, labelled worker="N"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exposed metric: its name as exposed (counters end in ``_total``), kind, help,
    label names, and how workers' values combine."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    merge: Merge = Merge.SUM


def _spec(name: str, kind: Kind, text: str, *labels: str, merge: Merge = Merge.SUM) -> MetricSpec:
    return MetricSpec(name, kind, text, labels, merge)


C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
#: Everything exposed, in exposition order. Names are a public interface: dashboards and
#: alerts are written against them (README, Operations).
METRICS: Final = (
    _spec(
        "dot_proxy_build_info", G, "Always 1; the version as a label.", "version", merge=Merge.MAX
    ),
    _spec("dot_proxy_queries_total", C, "DNS messages read from clients.", "transport"),
    _spec("dot_proxy_responses_total", C, "Responses sent to clients, by RCODE.", "rcode"),
    _spec("dot_proxy_dropped_total", C, "Queries not passed on, by reason.", "reason"),
    _spec(
        "dot_proxy_query_duration_seconds",
        H,
        "Time clients waited for an answer, from the read of the query to the send.",
    ),
    _spec("dot_proxy_queries_in_flight", G, "Queries being resolved now (--max-in-flight)."),
    _spec("dot_proxy_tcp_connections", G, "Client TCP connections open now."),
    _spec("dot_proxy_cache_hits_total", C, "Queries answered from the cache, fresh."),
    _spec("dot_proxy_cache_misses_total", C, "Cacheable queries the cache could not answer."),
    _spec(
        "dot_proxy_cache_stale_answers_total",
        C,
        "Expired answers served because the upstreams failed (RFC 8767).",
    ),
    _spec("dot_proxy_cache_evictions_total", C, "Answers dropped from a full cache."),
    _spec("dot_proxy_cache_entries", G, "Answers in the cache now."),
    _spec(
        "dot_proxy_upstream_queries_total",
        C,
        "Queries an upstream finished: answered, failed or overtaken by a hedge (probes too).",
        "upstream",
    ),
    _spec(
        "dot_proxy_upstream_failures_total",
        C,
        "Upstream queries that failed: timeout, error (connect, TLS, connection lost) or "
        "rcode (answered SERVFAIL or REFUSED).",
        "upstream",
        "reason",
    ),
    _spec(
        "dot_proxy_upstream_up",
        G,
        "1 while the upstream is usable (not marked down by its health record), else 0.",
        "upstream",
        merge=Merge.ANY,
    ),
    _spec("dot_proxy_upstream_rtt_seconds", H, "Upstream answer times.", "upstream"),
    _spec("dot_proxy_upstream_connections", G, "TLS connections open or opening.", "upstream"),
    _spec("dot_proxy_hedged_queries_total", C, "Queries also sent to the next upstream (hedges)."),
    _spec(
        "dot_proxy_config_reloads_total",
        C,
        "Configuration reloads (SIGHUP), by result.",
        "result",
        merge=Merge.MAX,
    ),
    _spec(
        "process_cpu_seconds_total",
        C,
        "Total user and system CPU time spent in seconds.",
        merge=Merge.PER_WORKER,
    ),
    _spec(
        "process_resident_memory_bytes",
        G,
        "Resident memory size in bytes.",
        merge=Merge.PER_WORKER,
    ),
    _spec(
        "process_virtual_memory_bytes", G, "Virtual memory size in bytes.", merge=Merge.PER_WORKER
    ),
    _spec(
        "process_start_time_seconds",
        G,
        "Start time of the process since unix epoch in seconds.",
        merge=Merge.PER_WORKER,
    ),
    _spec("process_open_fds", G, "Number of open file descriptors.", merge=Merge.PER_WORKER),
    _spec("process_max_fds", G, "Maximum number of open file descriptors.", merge=Merge.PER_WORKER),
)
SPECS: Final = {spec.name: spec for spec in METRICS}

Labels = tuple[str, ...]
Value = float | Histogram


@dataclass(slots=True)
class Snapshot:
    """Every metric's values at one moment: name → label values → a number or a Histogram."""

    values: dict[str, dict[Labels, Value]] = field(default_factory=dict)

    def set(self, name: str, value: Value, *labels: str) -> None:
        spec = SPECS[name]
        if len(labels) != len(spec.labels) or (spec.kind is Kind.HISTOGRAM) != isinstance(
            value, Histogram
        ):
            raise ValueError(f"{name}{labels}: does not fit {spec}")
        self.values.setdefault(name, {})[labels] = value

    def get(self, name: str, *labels: str) -> Value | None:
        return self.values.get(name, {}).get(labels)

    def series(self, name: str) -> Mapping[Labels, Value]:
        return self.values.get(name, {})

    def to_bytes(self) -> bytes:
        """A compact JSON form, for a worker's slot in shared memory."""
        encoded = {
            name: [
                [list(labels), [v.counts, v.sum] if isinstance(v, Histogram) else v]
                for labels, v in series.items()
            ]
            for name, series in self.values.items()
        }
        return json.dumps(encoded, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        """The snapshot :meth:`to_bytes` wrote; metrics this version does not know are skipped.

        Error handling: raises ValueError for bytes that are not such a snapshot.
        """
        try:
            decoded = json.loads(data)
            snapshot = cls()
            for name, rows in decoded.items():
                if name not in SPECS:
                    continue
                for labels, raw in rows:
                    value = Histogram(raw[0], raw[1]) if isinstance(raw, list) else float(raw)
                    snapshot.set(name, value, *labels)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a metrics snapshot: {exc}") from None
        return snapshot


def _combine(how: Merge, kind: Kind, old: Value, new: Value) -> Value:
    if isinstance(old, Histogram) and isinstance(new, Histogram):
        return old.plus(new)
    assert isinstance(old, float | int) and isinstance(new, float | int)
    if how is Merge.SUM:
        return old + new
    return max(old, new)


def merge(snapshots: Iterable[tuple[int, Snapshot]]) -> Snapshot:
    """Workers' snapshots (``(worker number, snapshot)``) as one, each metric by its
    :class:`Merge`; a per-worker metric gets the worker's number as its last label value."""
    total = Snapshot()
    for number, snapshot in snapshots:
        for name, series in snapshot.values.items():
            spec = SPECS[name]
            into = total.values.setdefault(name, {})
            for labels, value in series.items():
                if spec.merge is Merge.PER_WORKER:
                    into[(*labels, str(number))] = value
                elif labels in into:
                    into[labels] = _combine(spec.merge, spec.kind, into[labels], value)
                else:
                    into[labels] = value
    return total


def carry(base: Snapshot, live: Snapshot) -> Snapshot:
    """``live`` with the counts of ``base`` added: what a process that replaced another (a
    restarted worker) reports so that no counter goes back.

    Counters and histograms are added; gauges and per-worker (process) metrics are the live
    process's alone. A series of an upstream no longer configured (absent from ``live``) is
    dropped rather than carried forever.
    """
    result = Snapshot({name: dict(series) for name, series in live.values.items()})
    for name, series in base.values.items():
        spec = SPECS[name]
        if spec.kind is Kind.GAUGE or spec.merge is Merge.PER_WORKER:
            continue
        into = result.values.setdefault(name, {})
        for labels, value in series.items():
            if labels in into:
                into[labels] = _combine(Merge.SUM, spec.kind, into[labels], value)
            elif "upstream" not in spec.labels:
                into[labels] = value
    return result
