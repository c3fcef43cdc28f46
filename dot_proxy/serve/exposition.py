"""A metrics snapshot in the Prometheus text exposition format, by prometheus_client.

prometheus_client writes the format (escaping, ``le`` buckets, ``_sum``/``_count``, HELP and
TYPE lines) from metric families that a custom collector yields; the values come from a
:class:`~dot_proxy.core.metrics.Snapshot` read at scrape time, so no prometheus_client object
is touched on the query path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dot_proxy.core.metrics import METRICS, Histogram, Kind, Merge, MetricSpec, Snapshot

__all__ = ["CONTENT_TYPE", "render"]

#: The text format, version 0.0.4 (what Prometheus and promtool read).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot, *, per_worker: bool) -> None:
        self._snapshot = snapshot
        self._per_worker = per_worker

    def collect(self) -> Iterator[Metric]:
        for spec in METRICS:
            yield self._family(spec)

    def _family(self, spec: MetricSpec) -> Metric:
        labels = list(spec.labels)
        if self._per_worker and spec.merge is Merge.PER_WORKER:
            labels.append("worker")
        family: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if spec.kind is Kind.COUNTER:
            family = CounterMetricFamily(spec.name.removesuffix("_total"), spec.help, labels=labels)
        elif spec.kind is Kind.GAUGE:
            family = GaugeMetricFamily(spec.name, spec.help, labels=labels)
        else:
            family = HistogramMetricFamily(spec.name, spec.help, labels=labels)
        for values, value in sorted(self._snapshot.series(spec.name).items()):
            if isinstance(value, Histogram):
                assert isinstance(family, HistogramMetricFamily)
                family.add_metric(
                    list(values),
                    buckets=[(bound, float(count)) for bound, count in value.cumulative()],
                    sum_value=value.sum,
                )
            else:
                assert not isinstance(family, HistogramMetricFamily)
                family.add_metric(list(values), value)
        return family


def render(snapshot: Snapshot, *, per_worker: bool = False) -> bytes:
    """``snapshot`` in the text format. ``per_worker``: the process metrics carry a
    ``worker`` label (``--workers``; their last label value is the worker's number)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, per_worker=per_worker))
    return generate_latest(registry)
