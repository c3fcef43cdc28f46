"""The metrics model (core/metrics.py, core/slots.py) and its rendering, from known counters.

No event loop, no server: histograms, snapshots, how workers' snapshots add up, the shared
memory slots, and the text exposition parsed back with prometheus_client's own parser.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dot_proxy.core.metrics import (
    BUCKETS,
    METRICS,
    Histogram,
    Kind,
    Merge,
    Snapshot,
    carry,
    merge,
)
from dot_proxy.core.slots import SlotTable
from dot_proxy.serve.exposition import render

# --- Histogram ---------------------------------------------------------------------------------


def test_an_observation_counts_in_the_first_bucket_at_or_above_it() -> None:
    histogram = Histogram()
    histogram.observe(0.00025)  # on a bound: that bucket (le)
    histogram.observe(0.0003)
    histogram.observe(100.0)  # above them all
    assert histogram.counts[0] == 1
    assert histogram.counts[1] == 1
    assert histogram.counts[-1] == 1
    assert histogram.count == 3
    assert histogram.sum == pytest.approx(100.00055)


def test_cumulative_rows_end_with_inf_and_the_count() -> None:
    histogram = Histogram()
    histogram.observe_many(3, 0.003)
    histogram.observe(9.0)
    rows = histogram.cumulative()
    assert [bound for bound, _ in rows] == [*(repr(b) for b in BUCKETS), "+Inf"]
    assert dict(rows)["0.002"] == 0
    assert dict(rows)["0.004"] == 3
    assert rows[-1] == ("+Inf", 4)
    assert rows[0][0] == "0.00025" and rows[-2][0] == "8.192"


@given(st.lists(st.floats(min_value=0, max_value=20), max_size=50))
def test_cumulative_counts_never_decrease(values: list[float]) -> None:
    histogram = Histogram()
    for value in values:
        histogram.observe(value)
    counts = [count for _, count in histogram.cumulative()]
    assert counts == sorted(counts)
    assert counts[-1] == len(values)


def test_plus_adds_two_histograms() -> None:
    a, b = Histogram(), Histogram()
    a.observe(0.001)
    b.observe(0.001)
    b.observe(1.0)
    total = a.plus(b)
    assert total.count == 3
    assert total.sum == pytest.approx(1.002)
    assert a.count == 1  # unchanged


# --- Names ---------------------------------------------------------------------------------------

REQUIRED = {
    "dot_proxy_queries_total": ("transport",),
    "dot_proxy_responses_total": ("rcode",),
    "dot_proxy_dropped_total": ("reason",),
    "dot_proxy_query_duration_seconds": (),
    "dot_proxy_cache_hits_total": (),
    "dot_proxy_cache_misses_total": (),
    "dot_proxy_cache_entries": (),
    "dot_proxy_cache_stale_answers_total": (),
    "dot_proxy_upstream_queries_total": ("upstream",),
    "dot_proxy_upstream_failures_total": ("upstream", "reason"),
    "dot_proxy_upstream_up": ("upstream",),
    "dot_proxy_upstream_rtt_seconds": ("upstream",),
    "dot_proxy_upstream_connections": ("upstream",),
    "dot_proxy_hedged_queries_total": (),
    "dot_proxy_config_reloads_total": ("result",),
    "dot_proxy_build_info": ("version",),
    "process_cpu_seconds_total": (),
    "process_resident_memory_bytes": (),
    "process_open_fds": (),
}


def test_every_metric_the_issue_names_is_there_with_its_labels() -> None:
    specs = {spec.name: spec for spec in METRICS}
    for name, labels in REQUIRED.items():
        assert name in specs, name
        assert specs[name].labels == labels, name


@pytest.mark.parametrize("spec", METRICS, ids=[spec.name for spec in METRICS])
def test_names_follow_the_prometheus_naming_guide(spec: object) -> None:
    assert hasattr(spec, "name")
    name, kind, labels = spec.name, spec.kind, spec.labels  # type: ignore[attr-defined]
    assert re.fullmatch(r"[a-z_]+", name)
    assert name.startswith(("dot_proxy_", "process_"))
    assert name.endswith("_total") == (kind is Kind.COUNTER)
    if kind is Kind.HISTOGRAM:
        assert name.endswith("_seconds")  # base units
    # Low cardinality: never a query name or a client address.
    assert not {"name", "qname", "client", "address", "source"} & set(labels)


# --- Snapshots ---------------------------------------------------------------------------------


def test_a_value_must_fit_its_metric() -> None:
    snapshot = Snapshot()
    with pytest.raises(ValueError, match="does not fit"):
        snapshot.set("dot_proxy_queries_total", 1.0)  # its label is missing
    with pytest.raises(ValueError, match="does not fit"):
        snapshot.set("dot_proxy_query_duration_seconds", 1.0)  # not a histogram
    with pytest.raises(KeyError):
        snapshot.set("dot_proxy_no_such_thing", 1.0)


def _sample() -> Snapshot:
    snapshot = Snapshot()
    snapshot.set("dot_proxy_queries_total", 5.0, "udp")
    snapshot.set("dot_proxy_upstream_up", 1.0, "127.0.0.1:853#a.test")
    snapshot.set("dot_proxy_config_reloads_total", 2.0, "success")
    snapshot.set("process_open_fds", 12.0)
    histogram = Histogram()
    histogram.observe(0.01)
    snapshot.set("dot_proxy_query_duration_seconds", histogram)
    return snapshot


def test_a_snapshot_goes_through_bytes_unchanged() -> None:
    snapshot = _sample()
    assert Snapshot.from_bytes(snapshot.to_bytes()) == snapshot


@pytest.mark.parametrize("data", [b"", b"[1, 2]", b'{"dot_proxy_queries_total": [[["udp"]]]}'])
def test_bytes_that_are_no_snapshot_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        Snapshot.from_bytes(data)


def test_a_metric_of_another_version_is_skipped() -> None:
    assert Snapshot.from_bytes(b'{"dot_proxy_gone_total": [[[], 1]]}') == Snapshot()


def test_workers_add_up_each_metric_its_own_way() -> None:
    first, second = _sample(), _sample()
    second.set("dot_proxy_upstream_up", 0.0, "127.0.0.1:853#a.test")
    second.set("dot_proxy_config_reloads_total", 3.0, "success")  # one restarted, carried more
    total = merge([(0, first), (1, second)])
    assert total.get("dot_proxy_queries_total", "udp") == 10.0  # summed
    assert total.get("dot_proxy_upstream_up", "127.0.0.1:853#a.test") == 1.0  # any is up
    assert total.get("dot_proxy_config_reloads_total", "success") == 3.0  # all reload: max
    duration = total.get("dot_proxy_query_duration_seconds")
    assert isinstance(duration, Histogram) and duration.count == 2
    # Process metrics are each worker's own.
    assert total.series("process_open_fds") == {("0",): 12.0, ("1",): 12.0}


def test_merge_rules_cover_every_metric() -> None:
    for spec in METRICS:
        if spec.name.startswith("process_"):
            assert spec.merge is Merge.PER_WORKER
        elif spec.kind is not Kind.GAUGE and spec.name != "dot_proxy_config_reloads_total":
            assert spec.merge is Merge.SUM, spec.name


def test_a_restarted_worker_carries_its_predecessors_counts() -> None:
    before = _sample()
    before.set("dot_proxy_upstream_queries_total", 7.0, "127.0.0.1:853#gone.test")
    live = Snapshot()
    live.set("dot_proxy_queries_total", 1.0, "udp")
    live.set("dot_proxy_upstream_up", 0.0, "127.0.0.1:853#a.test")
    live.set("process_open_fds", 9.0)
    carried = carry(before, live)
    assert carried.get("dot_proxy_queries_total", "udp") == 6.0  # counters go on
    assert carried.get("dot_proxy_config_reloads_total", "success") == 2.0
    duration = carried.get("dot_proxy_query_duration_seconds")
    assert isinstance(duration, Histogram) and duration.count == 1
    assert carried.get("dot_proxy_upstream_up", "127.0.0.1:853#a.test") == 0.0  # gauges: live
    assert carried.get("process_open_fds") == 9.0
    # An upstream no longer configured is not carried forever.
    assert carried.get("dot_proxy_upstream_queries_total", "127.0.0.1:853#gone.test") is None


# --- Slots in shared memory --------------------------------------------------------------------


def test_a_slot_holds_what_its_writer_wrote() -> None:
    table = SlotTable(memoryview(bytearray(3 * 4096)), 3, size=4096)
    assert table.read(1) == b""  # never written
    table.write(1, b"one")
    table.write(1, b"longer")
    table.write(2, b"two")
    assert table.read(0) == b""
    assert table.read(1) == b"longer"
    assert table.read(2) == b"two"


def test_data_too_big_for_a_slot_leaves_it_as_it_was() -> None:
    table = SlotTable(memoryview(bytearray(2 * 4096)), 2, size=4096)
    table.write(0, b"kept")
    with pytest.raises(ValueError, match="do not fit"):
        table.write(0, b"x" * table.capacity + b"x")
    assert table.read(0) == b"kept"


def test_a_slot_being_written_reads_as_none_until_done() -> None:
    buffer = bytearray(4096)
    table = SlotTable(memoryview(buffer), 1, size=4096)
    table.write(0, b"first")
    buffer[0] += 1  # the sequence made odd: a write under way (or a writer that died in it)
    assert table.read(0) is None
    table.write(0, b"second")  # the next writer (a restarted worker) makes it whole again
    assert table.read(0) == b"second"


def test_a_buffer_too_small_is_refused() -> None:
    with pytest.raises(ValueError):
        SlotTable(memoryview(bytearray(100)), 2, size=64)


# --- Rendering ---------------------------------------------------------------------------------


def _parsed(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def test_rendering_from_known_counters() -> None:
    snapshot = _sample()
    snapshot.set("dot_proxy_upstream_rtt_seconds", Histogram([1] + [0] * 16, 0.0002), "u")
    parsed = _parsed(render(snapshot))
    assert parsed["dot_proxy_queries_total"] == {(("transport", "udp"),): 5.0}
    assert parsed["dot_proxy_query_duration_seconds_count"] == {(): 1.0}
    assert parsed["dot_proxy_query_duration_seconds_sum"] == {(): 0.01}
    buckets = parsed["dot_proxy_query_duration_seconds_bucket"]
    assert buckets[(("le", "0.008"),)] == 0.0
    assert buckets[(("le", "0.016"),)] == 1.0
    assert buckets[(("le", "+Inf"),)] == 1.0
    assert parsed["dot_proxy_upstream_rtt_seconds_bucket"][(("le", "0.00025"), ("upstream", "u"))]
    assert parsed["process_open_fds"] == {(): 12.0}


def test_every_metric_has_help_and_type_even_with_no_values() -> None:
    text = render(Snapshot()).decode()
    for spec in METRICS:
        assert f"# TYPE {spec.name} {spec.kind.value}" in text
        assert f"# HELP {spec.name} " in text


def test_per_worker_rendering_labels_the_process_metrics() -> None:
    parsed = _parsed(render(merge([(0, _sample()), (1, _sample())]), per_worker=True))
    assert parsed["process_open_fds"] == {(("worker", "0"),): 12.0, (("worker", "1"),): 12.0}
    assert parsed["dot_proxy_queries_total"] == {(("transport", "udp"),): 10.0}


def test_label_values_are_escaped() -> None:
    snapshot = Snapshot()
    snapshot.set("dot_proxy_upstream_up", 1.0, '[::1]:853#a"b\\c')
    parsed = _parsed(render(snapshot))
    assert parsed["dot_proxy_upstream_up"] == {(("upstream", '[::1]:853#a"b\\c'),): 1.0}
