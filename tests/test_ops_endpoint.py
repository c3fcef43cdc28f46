"""The operations endpoint in process: /healthz, /readyz, /metrics over real loopback HTTP.

The proxy and its endpoint run as ``dot-proxy --metrics`` runs them (tests/conftest.py
``start_ops_proxy``), against fake DoT upstreams, on virtual time where time matters.
"""

from __future__ import annotations

import trio
import trio.lowlevel
import trio.testing

from dot_proxy.core.metrics import Snapshot
from dot_proxy.core.slots import SlotTable
from dot_proxy.serve.ops import WorkerMetrics
from dot_proxy.serve.ops_http import MAX_REQUEST, REQUEST_TIMEOUT
from tests.clients import (
    http_get,
    http_request,
    parse_metrics,
    query,
    scrape,
    tcp_exchange,
    udp_exchange,
)
from tests.conftest import StartOpsProxy, StartUpstream
from tests.fakes import UpstreamConnection, answer_for, eventually, hang


async def test_health_readiness_and_anything_else(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    proxy = await start_ops_proxy([await start_upstream()])
    assert await http_get(proxy.http, "/healthz") == (200, b"ok\n")
    assert await http_get(proxy.http, "/readyz") == (200, b"ready\n")
    assert (await http_get(proxy.http, "/"))[0] == 404
    assert (await http_get(proxy.http, "/metrics/extra"))[0] == 404
    assert (await http_get(proxy.http, "/metrics", method="POST"))[0] == 405
    assert await http_get(proxy.http, "/readyz", method="HEAD") == (200, b"")
    assert (await http_get(proxy.http, "/healthz?verbose=1"))[0] == 200


async def test_metrics_is_the_text_format_with_every_series_from_the_first_scrape(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_ops_proxy([upstream])
    request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", proxy.http) as stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode().lower()
    assert "content-type: text/plain; version=0.0.4; charset=utf-8" in head
    metrics = await scrape(proxy.http)
    label = f'upstream="{upstream.spec}"'
    for series in (
        'dot_proxy_queries_total{transport="udp"}',
        'dot_proxy_queries_total{transport="tcp"}',
        'dot_proxy_responses_total{rcode="SERVFAIL"}',
        'dot_proxy_dropped_total{reason="busy"}',
        'dot_proxy_dropped_total{reason="malformed"}',
        'dot_proxy_dropped_total{reason="ratelimited"}',
        'dot_proxy_dropped_total{reason="refused"}',
        "dot_proxy_query_duration_seconds_count",
        "dot_proxy_cache_hits_total",
        "dot_proxy_cache_misses_total",
        "dot_proxy_cache_entries",
        "dot_proxy_cache_stale_answers_total",
        f"dot_proxy_upstream_queries_total{{{label}}}",
        f'dot_proxy_upstream_failures_total{{reason="timeout",{label}}}',
        f"dot_proxy_upstream_rtt_seconds_count{{{label}}}",
        f"dot_proxy_upstream_connections{{{label}}}",
        "dot_proxy_hedged_queries_total",
        'dot_proxy_config_reloads_total{result="error"}',
        'dot_proxy_config_reloads_total{result="success"}',
    ):
        assert metrics[series] == 0.0, series
    assert metrics[f"dot_proxy_upstream_up{{{label}}}"] == 1.0
    assert metrics['dot_proxy_build_info{version="0.1.0"}'] == 1.0
    assert metrics["process_open_fds"] > 0
    assert metrics["process_resident_memory_bytes"] > 0


async def test_counters_match_the_queries_sent(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_ops_proxy([upstream])
    for index in range(5):
        await udp_exchange(proxy.port, query(f"u{index}.example.").to_wire())
    for index in range(3):
        await tcp_exchange(proxy.port, query(f"t{index}.example.").to_wire())
    # A header that promises a question and has none: FORMERR, counted as malformed.
    await udp_exchange(proxy.port, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    metrics = await scrape(proxy.http)
    label = f'upstream="{upstream.spec}"'
    assert metrics['dot_proxy_queries_total{transport="udp"}'] == 6
    assert metrics['dot_proxy_queries_total{transport="tcp"}'] == 3
    assert metrics['dot_proxy_responses_total{rcode="NOERROR"}'] == 8
    assert metrics['dot_proxy_responses_total{rcode="FORMERR"}'] == 1
    assert metrics['dot_proxy_dropped_total{reason="malformed"}'] == 1
    assert metrics["dot_proxy_query_duration_seconds_count"] == 9
    assert metrics['dot_proxy_query_duration_seconds_bucket{le="+Inf"}'] == 9
    assert metrics["dot_proxy_query_duration_seconds_sum"] > 0
    assert metrics[f"dot_proxy_upstream_queries_total{{{label}}}"] == 8
    assert metrics[f"dot_proxy_upstream_rtt_seconds_count{{{label}}}"] == 8
    assert metrics[f"dot_proxy_upstream_connections{{{label}}}"] >= 1
    assert metrics["dot_proxy_queries_in_flight"] == 0
    assert len(upstream.queries) == 8


async def test_cache_counters_from_the_first_scrape_and_as_they_count(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    proxy = await start_ops_proxy([await start_upstream()], cache_size=100)
    metrics = await scrape(proxy.http)
    assert metrics["dot_proxy_cache_hits_total"] == 0
    wire = query("cached.example.").to_wire()
    for _ in range(3):
        await udp_exchange(proxy.port, wire)
    metrics = await scrape(proxy.http)
    assert metrics["dot_proxy_cache_misses_total"] == 1
    assert metrics["dot_proxy_cache_hits_total"] == 2
    assert metrics["dot_proxy_cache_entries"] == 1
    assert metrics["dot_proxy_query_duration_seconds_count"] == 3


class Switch:
    """An upstream that answers, or, while ``dead``, closes every connection it is given
    (its queries fail at once, as with an upstream that is gone)."""

    def __init__(self) -> None:
        self.dead = False

    async def __call__(self, connection: UpstreamConnection) -> None:
        while not self.dead and (received := await connection.receive_query()) is not None:
            if self.dead:
                return
            await connection.send(answer_for(received))


async def test_readiness_follows_the_upstream_down_and_back(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    clock: trio.testing.MockClock,
    hang_guard: None,
) -> None:
    switch = Switch()
    proxy = await start_ops_proxy([await start_upstream(switch)])
    await udp_exchange(proxy.port, query().to_wire())
    assert (await http_get(proxy.http, "/readyz"))[0] == 200
    switch.dead = True
    answer = await udp_exchange(proxy.port, query("down.example.").to_wire())
    assert answer[3] & 0x0F == 2  # SERVFAIL
    assert await http_get(proxy.http, "/readyz") == (503, b"not ready\n")
    assert (await http_get(proxy.http, "/healthz"))[0] == 200  # alive all the same
    metrics = await scrape(proxy.http)
    assert sum(v for k, v in metrics.items() if k.startswith("dot_proxy_upstream_up")) == 0
    switch.dead = False  # the prober finds it back
    await eventually(proxy.running.ready, within=30)
    assert (await http_get(proxy.http, "/readyz"))[0] == 200


async def test_not_ready_from_the_moment_a_stop_begins(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy, clock: trio.testing.MockClock
) -> None:
    proxy = await start_ops_proxy([await start_upstream(hang)])
    sent = trio.Event()

    async def in_flight() -> None:
        sent.set()
        await udp_exchange(proxy.port, query("held.example.").to_wire())  # held by the upstream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_flight)
        await sent.wait()
        await trio.sleep(0.1)
        assert (await http_get(proxy.http, "/readyz"))[0] == 200
        proxy.stop.set()
        await trio.lowlevel.checkpoint()
        # The grace period: queries in flight still finishing, the endpoint still answering.
        assert not proxy.stopped.is_set()
        assert await http_get(proxy.http, "/readyz") == (503, b"not ready\n")
        assert await http_get(proxy.http, "/healthz") == (503, b"not serving\n")
    await proxy.stopped.wait()


async def test_a_malformed_request_gets_400_and_the_connection_closes(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    proxy = await start_ops_proxy([await start_upstream()])
    status, _ = await http_request(proxy.http, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    huge = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 2 * MAX_REQUEST + b"\r\n\r\n"
    status, _ = await http_request(proxy.http, huge)
    assert status == 431
    # DNS goes on as ever.
    assert (await udp_exchange(proxy.port, query().to_wire()))[3] & 0x0F == 0


async def test_a_slow_request_is_closed(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy, clock: trio.testing.MockClock
) -> None:
    proxy = await start_ops_proxy([await start_upstream()])
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.http)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
    started = trio.current_time()
    assert await stream.receive_some(100) == b""  # closed, without an answer
    assert trio.current_time() - started >= REQUEST_TIMEOUT
    await stream.aclose()


async def test_keep_alive_serves_several_requests_on_one_connection(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    proxy = await start_ops_proxy([await start_upstream()])
    two = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.http)
    await stream.send_all(two)
    data = b""
    while data.count(b"HTTP/1.1 200") < 2:
        data += await stream.receive_some(65536)
    assert b"ok\n" in data and b"ready\n" in data
    await stream.aclose()


async def test_workers_metrics_add_up_and_a_restart_does_not_go_back(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy
) -> None:
    proxy = await start_ops_proxy([await start_upstream()])
    slots = SlotTable(memoryview(bytearray(2 * 65536)), 2, size=65536)
    other = Snapshot()
    other.set("dot_proxy_queries_total", 100.0, "udp")
    other.set("process_open_fds", 7.0)
    slots.write(1, other.to_bytes())  # worker 1's last publication
    first = WorkerMetrics(proxy.running, slots, 0)
    for index in range(2):
        await udp_exchange(proxy.port, query(f"w{index}.example.").to_wire())
    metrics = parse_metrics((await first.render()).decode())
    assert metrics['dot_proxy_queries_total{transport="udp"}'] == 102
    assert metrics['process_open_fds{worker="1"}'] == 7
    assert metrics['process_open_fds{worker="0"}'] > 0
    # Worker 0 restarts: a new process, its own counters at zero, starts from its slot.
    restarted = WorkerMetrics(proxy.running, slots, 0)
    proxy.running.stats.queries_udp = 0  # what a fresh process has counted
    metrics = parse_metrics((await restarted.render()).decode())
    assert metrics['dot_proxy_queries_total{transport="udp"}'] == 102
