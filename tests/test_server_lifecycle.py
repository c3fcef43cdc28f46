"""Graceful stop and the in-flight limit."""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Any

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy.config import Config, parse_upstream
from dot_proxy.handler import ServerStats
from dot_proxy.resolver import open_resolver
from dot_proxy.serve.server import serve
from dot_proxy.serve.sockets import UDP_RECEIVE_BUFFER, bind_sockets
from tests.clients import TcpClient, query, receive_until_closed, udp_exchange, udp_send
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    FakeUpstream,
    answer_after,
    hang,
)

GRACE = 1.0


class Served:
    """``serve`` run in the test's own nursery, so a test can see when it returns."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = ServerStats()
        self.stop = trio.Event()
        self.returned_at: float | None = None
        self.port = 0


async def _serve(
    nursery: trio.Nursery, upstream: FakeUpstream, ca_file: str, **options: Any
) -> Served:
    config = Config(
        upstreams=(parse_upstream(upstream.spec),),
        listen=("127.0.0.1",),
        port=0,
        ca_file=ca_file,
        **options,
    )
    served = Served(config)

    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(config, stop=served.stop, stats=served.stats, task_status=task_status)
        served.returned_at = trio.current_time()

    bound = await nursery.start(run)
    served.port = bound[0][2]
    return served


async def _send(transport: str, port: int, request: dns.message.Message) -> Any:
    """Send ``request`` over a new UDP socket or TCP connection; the client, to receive on."""
    if transport == "udp":
        return await udp_send(port, request.to_wire())
    client = await TcpClient.connect(port)
    await client.send(request.to_wire())
    return client


async def _receive(transport: str, client: Any) -> bytes | None:
    """The answer to :func:`_send`'s query (a UDP socket is closed after)."""
    if transport == "udp":
        with client:
            reply: bytes = await client.recv(65535)
            return reply
    answer: bytes | None = await client.receive()
    return answer


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_stop_lets_the_query_in_flight_finish(
    hang_guard: None,
    start_upstream: StartUpstream,
    ca_file: str,
    clock: trio.testing.MockClock,
    transport: str,
) -> None:
    upstream = await start_upstream(answer_after(0.5))
    async with trio.open_nursery() as nursery:
        served = await _serve(nursery, upstream, ca_file)
        request = query("inflight.example.", "A")
        client = await _send(transport, served.port, request)
        await upstream.wait_for_queries(1)
        stopped_at = trio.current_time()
        served.stop.set()
        reply = await _receive(transport, client)
        assert reply is not None
        answer = dns.message.from_wire(reply)
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.id == request.id
        assert trio.current_time() - stopped_at == pytest.approx(0.5, abs=0.01)
        if transport == "tcp":
            async with client.stream:
                # Closed by the end of the grace period at the latest; nothing else comes.
                assert await receive_until_closed(client) == []
            assert trio.current_time() - stopped_at <= GRACE + 0.01
    assert served.returned_at is not None
    if transport == "udp":
        # Nothing left in flight: serve returned at once, without waiting out the grace.
        assert served.returned_at - stopped_at == pytest.approx(0.5, abs=0.01)
    else:
        assert served.returned_at - stopped_at <= GRACE + 0.01


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_query_still_unanswered_when_the_grace_ends_gets_servfail(
    hang_guard: None,
    start_upstream: StartUpstream,
    ca_file: str,
    clock: trio.testing.MockClock,
    transport: str,
) -> None:
    # The upstream would answer after 3 s, within the query's 5 s deadline but past the
    # stop's grace: the client hears SERVFAIL when the grace ends, not silence until its own
    # timeout (dig waited 5 s and retried).
    upstream = await start_upstream(answer_after(3.0))
    async with trio.open_nursery() as nursery:
        served = await _serve(nursery, upstream, ca_file)
        request = query("slow.example.", "A", use_edns=0)
        client = await _send(transport, served.port, request)
        await upstream.wait_for_queries(1)
        stopped_at = trio.current_time()
        served.stop.set()
        reply = await _receive(transport, client)
        if transport == "tcp":
            await client.stream.aclose()
        assert trio.current_time() - stopped_at == pytest.approx(GRACE, abs=0.01)
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert (answer.id, answer.rcode()) == (request.id, dns.rcode.SERVFAIL)
    assert answer.question == request.question
    assert served.stats.servfail == 1
    assert served.returned_at is not None
    assert served.returned_at - stopped_at == pytest.approx(GRACE, abs=0.01)


async def test_stop_cuts_work_off_after_the_grace_period(
    hang_guard: None,
    start_upstream: StartUpstream,
    ca_file: str,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream(hang)
    async with trio.open_nursery() as nursery:
        served = await _serve(nursery, upstream, ca_file, timeout=30.0, tcp_idle_timeout=30.0)
        request = query("forever.example.", "A")
        udp_client = await udp_send(served.port, request.to_wire())
        idle_client = await TcpClient.connect(served.port)  # an idle TCP client as well
        await upstream.wait_for_queries(1)
        stopped_at = trio.current_time()
        served.stop.set()
    assert served.returned_at is not None
    assert served.returned_at - stopped_at == pytest.approx(GRACE, abs=0.01)
    async with idle_client.stream:
        assert await receive_until_closed(idle_client) == []
    udp_client.close()


async def test_no_new_clients_after_stop(
    hang_guard: None, start_upstream: StartUpstream, ca_file: str
) -> None:
    upstream = await start_upstream()
    async with trio.open_nursery() as nursery:
        served = await _serve(nursery, upstream, ca_file)
        assert (await udp_exchange(served.port, query().to_wire())) is not None
        served.stop.set()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", served.port)


async def test_a_resolver_passed_in_stays_open_after_serve_returns(
    hang_guard: None, start_upstream: StartUpstream, ca_file: str
) -> None:
    upstream = await start_upstream()
    config = Config(
        upstreams=(parse_upstream(upstream.spec),), listen=("127.0.0.1",), port=0, ca_file=ca_file
    )
    async with open_resolver(config) as resolver:
        for round_ in range(2):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(partial(serve, config, stop=stop, resolver=resolver))
                request = query(f"round{round_}.example.", "A")
                answer = dns.message.from_wire(await udp_exchange(bound[0][2], request.to_wire()))
                assert answer.rcode() == dns.rcode.NOERROR
                stop.set()
    # Both servers asked through the one pooled connection: the first serve left it open.
    assert upstream.handshakes == 1
    assert len(upstream.queries) == 2


async def test_in_flight_limit_drops_the_query_over_it(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream(hang)
    proxy = await start_proxy([upstream], max_in_flight=2, timeout=5.0)
    first, second, third = (query(f"q{n}.example.", "A") for n in range(3))
    sockets = [await udp_send(proxy.port, first.to_wire())]
    sockets.append(await udp_send(proxy.port, second.to_wire()))
    await upstream.wait_for_queries(2)
    start = trio.current_time()
    sockets.append(await udp_send(proxy.port, third.to_wire()))
    # The first two get SERVFAIL at their deadline; the third got nothing at all.
    for sock, request in zip(sockets[:2], (first, second), strict=True):
        answer = dns.message.from_wire(await sock.recv(65535))
        assert answer.id == request.id
        assert answer.rcode() == dns.rcode.SERVFAIL
    assert trio.current_time() - start <= 5.0
    with trio.move_on_after(10.0) as waited:
        await sockets[2].recv(65535)
    assert waited.cancelled_caught, "the query over the limit was answered"
    assert proxy.stats.dropped_busy == 1
    assert len(upstream.queries) == 2
    for sock in sockets:
        sock.close()


async def test_in_flight_limit_frees_slots_after_answers(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], max_in_flight=1)
    for number in range(5):
        request = query(f"n{number}.example.", "A")
        answer = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
        assert answer.id == request.id
        assert answer.rcode() == dns.rcode.NOERROR
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        requests = [query(f"t{number}.example.", "A") for number in range(5)]
        await client.send(*(r.to_wire() for r in requests))
        ids = set()
        for _ in requests:
            reply = await client.receive()
            assert reply is not None
            ids.add(dns.message.from_wire(reply).id)
        assert ids == {r.id for r in requests}
    assert proxy.stats.dropped_busy == 0


def test_udp_sockets_get_a_receive_buffer_far_above_the_default() -> None:
    # A client that sends a thousand queries at once must not overflow the kernel's default
    # 208 KiB (soak: an upstream came back, a thousand answers, a thousand new queries).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    config = Config(
        upstreams=(parse_upstream("127.0.0.1:853#dns.test"),), listen=("127.0.0.1",), port=0
    )
    sockets = bind_sockets(config)
    try:
        [udp] = [s for s in sockets if s.type == socket.SOCK_DGRAM]
        granted = udp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert granted > default
        if os.geteuid() == 0:  # SO_RCVBUFFORCE: the whole size (Linux reports it doubled)
            assert granted >= UDP_RECEIVE_BUFFER
    finally:
        for sock in sockets:
            sock.close()
