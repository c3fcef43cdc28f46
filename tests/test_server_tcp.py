"""TCP clients: pipelining (RFC 7766 §6.2.1.1), any-order answers (§7), idle connections."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from tests.clients import TcpClient, query, receive_until_closed, tcp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    Behaviour,
    UpstreamConnection,
    answer_for,
    answer_in_reverse,
    answering,
    hang,
    txt_answer_for,
)

IDLE = 10.0


def _requests(count: int, rdtype: str = "A") -> list[dns.message.Message]:
    requests = []
    for number in range(count):
        request = query(f"q{number}.example.", rdtype)
        request.id = 1000 + number
        requests.append(request)
    return requests


async def _pipeline(client: TcpClient, requests: list[dns.message.Message]) -> dict[int, bytes]:
    """Write every query back to back, then read as many answers; answers by ID."""
    await client.send(*(request.to_wire() for request in requests))
    answers: dict[int, bytes] = {}
    for _ in requests:
        reply = await client.receive()
        assert reply is not None, "the proxy closed the connection with answers due"
        answer_id = (reply[0] << 8) | reply[1]
        assert answer_id not in answers, "two answers with one ID"
        answers[answer_id] = reply
    return answers


def _check_answers(requests: list[dns.message.Message], answers: dict[int, bytes]) -> None:
    assert sorted(answers) == sorted(request.id for request in requests)
    for request in requests:
        answer = dns.message.from_wire(answers[request.id])  # each frame parses whole
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.question == request.question


async def test_pipelined_queries_all_get_their_answers(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    requests = _requests(100)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        _check_answers(requests, await _pipeline(client, requests))
        # The connection stays usable for more.
        more = _requests(3)
        _check_answers(more, await _pipeline(client, more))


async def test_answers_out_of_order_from_the_upstream(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream(answer_in_reverse(batch=20))
    proxy = await start_proxy([upstream], max_connections=1)
    requests = _requests(20)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        _check_answers(requests, await _pipeline(client, requests))


def answer_after_by_name(delays: dict[str, float]) -> Behaviour:
    """Answer each query after the delay given for its name, each on its own timer."""

    async def behaviour(connection: UpstreamConnection) -> None:
        lock = trio.Lock()

        async def answer_later(wire: bytes) -> None:
            name = dns.message.from_wire(wire).question[0].name.to_text()
            await trio.sleep(delays[name])
            async with lock:
                await connection.send(answer_for(wire))

        async with trio.open_nursery() as nursery:
            while (wire := await connection.receive_query()) is not None:
                nursery.start_soon(answer_later, wire)

    return behaviour


async def test_answers_go_back_as_each_completes(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
) -> None:
    # The first query's answer takes 1.2 s, the second's 0.5 s: the client gets the second
    # after 0.5 s, without waiting behind the first (RFC 7766 §7: no head-of-line blocking).
    # (Both within stall_timeout of the last answer: this is not about stale connections.)
    first, second = _requests(2)
    upstream = await start_upstream(answer_after_by_name({"q0.example.": 1.2, "q1.example.": 0.5}))
    proxy = await start_proxy([upstream])
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        start = trio.current_time()
        await client.send(first.to_wire(), second.to_wire())
        reply = await client.receive()
        assert reply is not None
        assert dns.message.from_wire(reply).id == second.id
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)
        reply = await client.receive()
        assert reply is not None
        assert dns.message.from_wire(reply).id == first.id
        assert trio.current_time() - start == pytest.approx(1.2, abs=0.01)
    assert upstream.handshakes == 1


async def test_big_pipelined_answers_never_interleave(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # Answers of 1-16 KB, many in flight: if two writes interleaved, a frame would not parse
    # or would carry another query's question.
    def big(wire: bytes) -> bytes:
        number = int(dns.message.from_wire(wire).question[0].name.labels[0][1:])
        return txt_answer_for(wire, 1000 + 1500 * (number % 11))

    upstream = await start_upstream(answering(big))
    proxy = await start_proxy([upstream])
    requests = _requests(60, "TXT")
    clients = [await TcpClient.connect(proxy.port) for _ in range(3)]
    try:
        async with trio.open_nursery() as nursery:
            for client in clients:

                async def run(client: TcpClient = client) -> None:
                    answers = await _pipeline(client, requests)
                    _check_answers(requests, answers)
                    for request in requests:
                        number = int(request.question[0].name.labels[0][1:])
                        assert len(answers[request.id]) > 1000 + 1500 * (number % 11) - 14

                nursery.start_soon(run)
    finally:
        for client in clients:
            await client.aclose()


async def test_idle_client_connection_is_closed(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], tcp_idle_timeout=IDLE)
    # Silent from the start.
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        start = trio.current_time()
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start == pytest.approx(IDLE, abs=0.01)
    # Silent after an answer: the idle time counts from the last query.
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        await trio.sleep(IDLE * 0.6)
        await client.send(query().to_wire())
        assert await client.receive() is not None
        start = trio.current_time()
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start == pytest.approx(IDLE, abs=0.01)


async def test_half_sent_frame_is_closed_while_others_are_served(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], tcp_idle_timeout=IDLE)
    stalled = await TcpClient.connect(proxy.port)
    async with stalled.stream:
        start = trio.current_time()
        framed = len(query().to_wire()).to_bytes(2, "big") + query().to_wire()
        await stalled.stream.send_all(framed[:9])  # the length and part of the message
        # Meanwhile another client, on another connection, is served at once, repeatedly.
        for _ in range(3):
            await trio.sleep(IDLE / 4)
            request = query("other.example.", "A")
            reply = await tcp_exchange(proxy.port, request.to_wire())
            assert reply is not None
            assert dns.message.from_wire(reply).id == request.id
        assert await receive_until_closed(stalled) == []
        assert trio.current_time() - start == pytest.approx(IDLE, abs=0.01)
    assert len(upstream.queries) == 3


async def test_half_a_length_prefix_is_closed_too(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], tcp_idle_timeout=IDLE)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        start = trio.current_time()
        await client.stream.send_all(b"\x00")
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start == pytest.approx(IDLE, abs=0.01)


async def test_a_query_in_flight_keeps_the_connection_open(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
) -> None:
    # The idle timer is for silent clients, not for slow answers: a query still being resolved
    # when the idle time passes gets its answer (here SERVFAIL at its deadline) on the
    # connection, which then closes after a further idle period.
    upstream = await start_upstream(hang)
    proxy = await start_proxy([upstream], tcp_idle_timeout=2.0, timeout=5.0)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        start = trio.current_time()
        request = query()
        await client.send(request.to_wire())
        reply = await client.receive()
        assert reply is not None
        answer = dns.message.from_wire(reply)
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert answer.id == request.id
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start <= 5.0 + 2.0 + 0.01
