"""The answer cache in the running proxy: in-process, real loopback sockets, a fake upstream.

Virtual time (trio's MockClock) makes expiry, the TTL countdown, prefetch and serve-stale exact:
the fake upstream counts every query it gets, so "answered from the cache" means "the upstream
saw nothing".
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from tests.clients import TcpClient, query, tcp_exchange, udp_exchange, udp_send
from tests.conftest import RunningProxy, StartProxy, StartUpstream
from tests.fakes import (
    FakeUpstream,
    UpstreamConnection,
    answer_for,
    answering,
    txt_answer_for,
)

TTL = 300
EXCHANGES = [pytest.param(udp_exchange, id="udp"), pytest.param(tcp_exchange, id="tcp")]


@dataclass
class Switch:
    """What a switchable fake upstream does with the next query: answer (with ``ttl``),
    SERVFAIL, hang, or close the connection."""

    mode: str = "answer"
    ttl: int = TTL
    address: str = "192.0.2.1"


def switchable(switch: Switch) -> object:
    async def behaviour(connection: UpstreamConnection) -> None:
        while (wire := await connection.receive_query()) is not None:
            if switch.mode == "answer":
                await connection.send(answer_for(wire, address=switch.address, ttl=switch.ttl))
            elif switch.mode == "servfail":
                response = dns.message.make_response(dns.message.from_wire(wire))
                response.set_rcode(dns.rcode.SERVFAIL)
                await connection.send(response.to_wire())
            elif switch.mode == "close":
                return

    return behaviour


async def cached_proxy(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    switch: Switch | None = None,
    **options: object,
) -> tuple[FakeUpstream, RunningProxy]:
    upstream = await start_upstream(switchable(switch or Switch()))
    options.setdefault("cache_size", 1000)
    proxy = await start_proxy([upstream], **options)
    return upstream, proxy


async def ask(
    proxy: RunningProxy, exchange: object = udp_exchange, **kwargs: object
) -> dns.message.Message:
    request = query(**kwargs)  # type: ignore[arg-type]
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert reply is not None
    return dns.message.from_wire(reply)


def answer_ttl(reply: dns.message.Message) -> int:
    return reply.answer[0].ttl


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_a_repeated_query_is_answered_with_no_upstream_traffic(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    exchange: object,
) -> None:
    upstream, proxy = await cached_proxy(start_upstream, start_proxy)
    first = await ask(proxy, exchange)
    for client_id in (1, 0xBEEF):
        request = query("EXAMPLE.com.", "A")
        request.id = client_id
        reply = dns.message.from_wire(await exchange(proxy.port, request.to_wire()))  # type: ignore[operator]
        assert reply.id == client_id
        assert reply.question == request.question
        assert reply.question[0].name.to_text() == "EXAMPLE.com."  # its own letter case
        assert reply.answer == first.answer
    assert len(upstream.queries) == 1


async def test_pipelined_hits_on_one_tcp_connection(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream, proxy = await cached_proxy(start_upstream, start_proxy)
    await ask(proxy)
    client = await TcpClient.connect(proxy.port)
    requests = [query("example.com.", "A") for _ in range(20)]
    await client.send(*(request.to_wire() for request in requests))
    replies = [dns.message.from_wire(await client.receive() or b"") for _ in requests]
    await client.aclose()
    assert sorted(reply.id for reply in replies) == sorted(request.id for request in requests)
    assert len(upstream.queries) == 1


async def test_ttls_count_down_by_whole_seconds_and_the_answer_expires(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream, proxy = await cached_proxy(start_upstream, start_proxy, Switch(ttl=100))
    assert answer_ttl(await ask(proxy)) == 100
    await trio.sleep(2.5)
    assert answer_ttl(await ask(proxy)) == 98
    await trio.sleep(95)  # 97.5 s in: 2 left, but inside the prefetch window (last 10 s)
    assert answer_ttl(await ask(proxy)) == 3
    assert len(upstream.queries) == 1 or len(upstream.queries) == 2  # prefetch may be under way


async def test_an_expired_answer_is_asked_for_again(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    switch = Switch(ttl=10)
    upstream, proxy = await cached_proxy(start_upstream, start_proxy, switch, serve_stale=0)
    await ask(proxy)
    await trio.sleep(10.5)
    switch.address = "192.0.2.2"
    reply = await ask(proxy)
    assert reply.answer[0][0].to_text() == "192.0.2.2"
    assert len(upstream.queries) == 2


async def test_a_popular_answer_is_refreshed_before_it_expires(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    switch = Switch(ttl=100)
    upstream, proxy = await cached_proxy(start_upstream, start_proxy, switch)
    await ask(proxy)
    await trio.sleep(89)  # 11 s left: more than a tenth, no prefetch
    await ask(proxy)
    assert len(upstream.queries) == 1
    switch.address = "192.0.2.2"
    await trio.sleep(2)  # 9 s left: the hit is served, and refreshed in the background
    reply = await ask(proxy)
    assert reply.answer[0][0].to_text() == "192.0.2.1"
    await upstream.wait_for_queries(2)
    await trio.sleep(10)  # past the old expiry: the refreshed answer is served, no new query
    reply = await ask(proxy)
    assert reply.answer[0][0].to_text() == "192.0.2.2"
    assert len(upstream.queries) == 2


async def test_identical_queries_in_flight_make_one_upstream_query(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    slow = trio.Event()

    async def answer_when_released(connection: UpstreamConnection) -> None:
        while (wire := await connection.receive_query()) is not None:
            await slow.wait()
            await connection.send(answer_for(wire))

    upstream = await start_upstream(answer_when_released)
    proxy = await start_proxy([upstream], cache_size=1000, max_in_flight=2000)
    replies: dict[int, dns.message.Message] = {}
    names = ["example.com.", "EXAMPLE.COM.", "ExAmPlE.cOm."]

    async def one(index: int) -> None:
        request = query(names[index % 3], "A")
        request.id = index
        reply = await udp_exchange(proxy.port, request.to_wire())
        replies[index] = dns.message.from_wire(reply)
        assert replies[index].question == request.question
        assert replies[index].question[0].name.to_text() == names[index % 3]

    async with trio.open_nursery() as nursery:
        for index in range(300):
            nursery.start_soon(one, index)
        await upstream.wait_for_queries(1)
        await trio.sleep(1)
        slow.set()
    assert sorted(replies) == list(range(300))
    assert len(upstream.queries) == 1


async def test_a_client_subnet_query_bypasses_the_cache(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    # With --keep-ecs the option goes upstream and the answer is that network's. (By default
    # it is removed, and the query shares the cache: tests/test_split_dns.py.)
    upstream, proxy = await cached_proxy(start_upstream, start_proxy, keep_ecs=True)
    for _ in range(2):
        request = query(use_edns=0, options=[dns.edns.ECSOption("198.51.100.0", 24)])
        assert await udp_exchange(proxy.port, request.to_wire())
    assert len(upstream.queries) == 2


async def test_do_and_cd_make_their_own_entries(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream, proxy = await cached_proxy(start_upstream, start_proxy)
    await ask(proxy)
    await ask(proxy, use_edns=0)  # same entry: EDNS alone does not matter
    assert len(upstream.queries) == 1
    await ask(proxy, use_edns=0, want_dnssec=True)
    assert len(upstream.queries) == 2
    await ask(proxy, flags=dns.flags.RD | dns.flags.CD)
    assert len(upstream.queries) == 3


async def test_a_servfail_is_never_kept_and_the_next_query_asks_again(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    switch = Switch(mode="servfail")
    upstream, proxy = await cached_proxy(start_upstream, start_proxy, switch)
    assert (await ask(proxy)).rcode() == dns.rcode.SERVFAIL
    switch.mode = "answer"
    reply = await ask(proxy)  # one soft failure from the only upstream costs nothing more
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(upstream.queries) == 2


async def test_a_big_answer_fetched_over_tcp_is_truncated_for_a_plain_udp_client(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream = await start_upstream(answering(lambda wire: txt_answer_for(wire, 3000)))
    proxy = await start_proxy([upstream], cache_size=1000)
    whole = await ask(proxy, tcp_exchange, name="big.example.", rdtype="TXT")
    assert len(whole.to_wire()) > 512
    request = query("big.example.", "TXT")
    reply_wire = await udp_exchange(proxy.port, request.to_wire())
    assert len(reply_wire) <= 512
    reply = dns.message.from_wire(reply_wire)
    assert reply.flags & dns.flags.TC
    assert reply.id == request.id
    assert len(upstream.queries) == 1


async def expired_then(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    switch: Switch,
    mode: str,
    serve_stale: float,
) -> tuple[FakeUpstream, RunningProxy]:
    """A proxy whose one cached answer expired 10 s ago, its upstream now in ``mode``."""
    upstream, proxy = await cached_proxy(
        start_upstream, start_proxy, switch, serve_stale=serve_stale
    )
    await ask(proxy)
    switch.mode = mode
    await trio.sleep(switch.ttl + 10)
    return upstream, proxy


async def test_serve_stale_when_the_upstream_fails_and_recovery(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    switch = Switch(ttl=10)
    upstream, proxy = await expired_then(start_upstream, start_proxy, switch, "servfail", 3600)
    started = trio.current_time()
    reply = await ask(proxy)
    assert reply.rcode() == dns.rcode.NOERROR
    assert answer_ttl(reply) == 30  # RFC 8767 §4
    assert trio.current_time() - started < 1.8  # a SERVFAIL from upstream: stale at once
    asked = len(upstream.queries)
    # RFC 8767's failure recheck: for 30 s the stale answer goes out with no new attempt.
    await trio.sleep(10)
    assert answer_ttl(await ask(proxy)) == 30
    assert len(upstream.queries) == asked
    switch.mode = "answer"
    switch.address = "192.0.2.2"
    await trio.sleep(25)  # past the recheck time: the next query refreshes, fresh again
    reply = await ask(proxy)
    assert reply.answer[0][0].to_text() == "192.0.2.2"
    assert answer_ttl(reply) == 10


async def test_serve_stale_when_the_upstream_does_not_answer_in_time(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    _upstream, proxy = await expired_then(start_upstream, start_proxy, Switch(ttl=10), "hang", 3600)
    started = trio.current_time()
    reply = await ask(proxy)
    waited = trio.current_time() - started
    assert reply.rcode() == dns.rcode.NOERROR
    assert answer_ttl(reply) == 30
    assert 1.8 <= waited < 2.5  # RFC 8767's client response timer, not the 5 s deadline


async def test_without_serve_stale_a_failing_upstream_means_servfail(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    _upstream, proxy = await expired_then(
        start_upstream, start_proxy, Switch(ttl=10), "servfail", 0
    )
    assert (await ask(proxy)).rcode() == dns.rcode.SERVFAIL


async def test_a_cached_answer_respects_max_in_flight(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    hold = trio.Event()

    async def hold_slow(connection: UpstreamConnection) -> None:
        while (wire := await connection.receive_query()) is not None:
            if b"slow" in wire:
                await hold.wait()
            await connection.send(answer_for(wire))

    upstream = await start_upstream(hold_slow)
    proxy = await start_proxy([upstream], cache_size=1000, max_in_flight=1)
    await ask(proxy)  # cached now
    waiting = await udp_send(proxy.port, query("slow.example.", "A").to_wire())
    await upstream.wait_for_queries(2)  # the one slot is taken
    dropped = await udp_send(proxy.port, query("example.com.", "A").to_wire())
    with trio.move_on_after(1):
        await dropped.recv(65535)
        pytest.fail("a cached answer went out past --max-in-flight")
    assert proxy.stats.dropped_busy == 1
    hold.set()
    assert await waiting.recv(65535)
    waiting.close()
    dropped.close()
    assert (await ask(proxy)).rcode() == dns.rcode.NOERROR


async def test_a_query_repeated_byte_for_byte_follows_the_cache(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    # The same bytes but for the ID: the answer remembered for them is the cache's own, for
    # the same second only, and never outlives the cached answer it came from.
    switch = Switch(ttl=20)
    upstream, proxy = await cached_proxy(start_upstream, start_proxy, switch, serve_stale=0)
    wire = query("example.com.", "A").to_wire()
    ttls = []
    for step, client_id in enumerate((1, 2, 3, 4)):
        reply = dns.message.from_wire(
            await udp_exchange(proxy.port, client_id.to_bytes(2, "big") + wire[2:])
        )
        assert reply.id == client_id
        ttls.append(answer_ttl(reply))
        if step == 1:
            await trio.sleep(1.2)
    assert ttls == [20, 20, 19, 19]
    switch.address = "192.0.2.2"
    await trio.sleep(20)  # expired: asked again, and the new answer is the one repeated
    for client_id in (5, 6):
        reply = dns.message.from_wire(
            await udp_exchange(proxy.port, client_id.to_bytes(2, "big") + wire[2:])
        )
        assert reply.answer[0][0].to_text() == "192.0.2.2"
    assert len(upstream.queries) == 2
