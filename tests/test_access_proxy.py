"""The access list and the rate limit through the whole proxy, in process: a fake upstream and
the proxy on loopback, on virtual time (the ``clock`` fixture of tests/conftest.py). The policy
itself is tested pure in tests/test_access.py.
"""

from __future__ import annotations

import logging
import socket

import dns.flags
import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy.core.access import DEFAULT_ALLOW
from tests.clients import TcpClient, query, receive_until_closed, udp_send
from tests.conftest import StartProxy, StartUpstream

TIMEOUT = 5.0  # the proxy's deadline


# --- the access list through the proxy -----------------------------------------------------------


def _check_refused(reply: bytes | None, request: dns.message.Message) -> None:
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.rcode() == dns.rcode.REFUSED
    assert answer.id == request.id
    assert answer.question == request.question
    assert answer.answer == []
    assert answer.flags & dns.flags.QR


async def test_a_denied_udp_client_gets_refused_and_nothing_goes_upstream(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=("10.0.0.0/8",))  # not 127.0.0.1
    requests = [query(f"n{n}.example.", "A") for n in range(3)]
    with await udp_send(proxy.port, requests[0].to_wire()) as sock:
        for request in requests[1:]:
            await sock.send(request.to_wire())
        for request in requests:
            _check_refused(await sock.recv(65535), request)
    assert proxy.stats.refused == 3
    assert fake.connections == 0
    assert fake.queries == []


async def test_a_denied_udp_source_gets_nothing_for_a_response_or_a_fragment(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # No reflection: a spoofed response or junk from outside the list is not answered at all.
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=("10.0.0.0/8",))
    response = dns.message.make_response(query("reflect.example.", "A"))
    with await udp_send(proxy.port, response.to_wire()) as sock:
        await sock.send(b"\x12\x34\x01\x00")  # shorter than a header
        request = query("after.example.", "A")
        await sock.send(request.to_wire())
        # The first datagram back is the REFUSED to the query: nothing came before it.
        _check_refused(await sock.recv(65535), request)
    assert proxy.stats.refused == 3
    assert fake.queries == []


async def test_a_denied_tcp_client_gets_one_refused_then_the_connection_closes(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=("10.0.0.0/8",), tcp_idle_timeout=30.0)
    first, second = query("one.example.", "A"), query("two.example.", "AAAA")
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        await client.send(first.to_wire(), second.to_wire())
        _check_refused(await client.receive(), first)
        assert await receive_until_closed(client) == []  # nothing for the second: closed
    assert proxy.stats.refused == 1
    assert fake.connections == 0
    assert fake.queries == []


async def test_a_denied_tcp_client_that_sends_nothing_is_closed_within_two_seconds(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=("10.0.0.0/8",), tcp_idle_timeout=30.0)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        start = trio.current_time()
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)


async def test_a_denied_tcp_client_sending_a_response_is_closed_without_a_reply(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=("10.0.0.0/8",), tcp_idle_timeout=30.0)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        await client.send(dns.message.make_response(query()).to_wire())
        start = trio.current_time()
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start < 0.5  # closed at once, not after a timeout


async def test_an_allowed_client_is_served(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=("10.0.0.0/8", "127.0.0.1/32"))
    request = query("ok.example.", "A")
    with await udp_send(proxy.port, request.to_wire()) as sock:
        answer = dns.message.from_wire(await sock.recv(65535))
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.id == request.id
    assert proxy.stats.refused == 0


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_the_startup_log_names_the_access_list(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dot_proxy")
    fake = await start_upstream()
    await start_proxy([fake], allow=("10.0.0.0/8", "fd00::/8"))
    assert "clients allowed from 10.0.0.0/8, fd00::/8" in _messages(caplog, logging.INFO)
    assert _messages(caplog, logging.WARNING) == []


async def test_the_startup_log_names_the_default_list_without_a_warning(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dot_proxy")
    fake = await start_upstream()
    await start_proxy([fake])
    [line] = [m for m in _messages(caplog, logging.INFO) if m.startswith("clients allowed")]
    for network in DEFAULT_ALLOW:
        assert network in line
    assert _messages(caplog, logging.WARNING) == []


@pytest.mark.parametrize(
    "allow", [("0.0.0.0/0", "::/0"), ("0.0.0.0/0",), ("10.0.0.0/8", "::/0")], ids=str
)
async def test_an_open_access_list_is_warned_about(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    allow: tuple[str, ...],
) -> None:
    caplog.set_level(logging.INFO, logger="dot_proxy")
    fake = await start_upstream()
    proxy = await start_proxy([fake], allow=allow)
    [warning] = _messages(caplog, logging.WARNING)
    assert "open resolver" in warning
    assert f"clients allowed from {', '.join(allow)}" in _messages(caplog, logging.INFO)
    if "0.0.0.0/0" in allow:
        request = query("open.example.", "A")
        with await udp_send(proxy.port, request.to_wire()) as sock:
            answer = dns.message.from_wire(await sock.recv(65535))
        assert answer.rcode() == dns.rcode.NOERROR


# --- the rate limit through the proxy ------------------------------------------------------------

RATE = 5


def _burst(count: int, tag: str) -> list[dns.message.Message]:
    requests = []
    for number in range(count):
        request = query(f"{tag}{number}.example.", "A")
        request.id = 1000 * (ord(tag[0]) - 96) + number
        requests.append(request)
    return requests


def _send_burst(sock: socket.socket, requests: list[dns.message.Message]) -> None:
    # Plain blocking sends with no await between them: every datagram is in the proxy's
    # receive buffer before it wakes, so it takes them all at one (virtual) instant.
    for request in requests:
        sock.send(request.to_wire())


async def _receive_answers(sock: trio.socket.SocketType, count: int) -> list[dns.message.Message]:
    return [dns.message.from_wire(await sock.recv(65535)) for _ in range(count)]


async def test_udp_over_the_rate_is_dropped_and_passes_again_a_second_later(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], ratelimit=RATE)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.connect(("127.0.0.1", proxy.port))
    with trio.socket.from_stdlib_socket(plain) as sock:
        first = _burst(20, "a")
        _send_burst(plain, first)
        answers = await _receive_answers(sock, RATE)
        # The first RATE of the burst are answered; the other 15 were dropped, not queued.
        assert sorted(a.id for a in answers) == [r.id for r in first[:RATE]]
        assert all(a.rcode() == dns.rcode.NOERROR for a in answers)
        assert proxy.stats.ratelimited == 20 - RATE
        assert len(fake.queries) == RATE

        await trio.sleep(1.0)
        second = _burst(20, "b")
        _send_burst(plain, second)
        answers = await _receive_answers(sock, RATE)
        assert sorted(a.id for a in answers) == [r.id for r in second[:RATE]]
        assert proxy.stats.ratelimited == 2 * (20 - RATE)

        # Nothing else ever comes: the dropped queries are not answered late either.
        with trio.move_on_after(TIMEOUT + 1.0) as waited:
            await sock.recv(65535)
        assert waited.cancelled_caught
    assert len(fake.queries) == 2 * RATE
    assert proxy.stats.dropped_busy == 0


async def test_tcp_over_the_rate_gets_refused_on_an_open_connection(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], ratelimit=RATE, tcp_idle_timeout=30.0)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        requests = _burst(8, "t")
        await client.send(*(r.to_wire() for r in requests))
        replies = {}
        for _ in requests:
            reply = await client.receive()
            assert reply is not None
            answer = dns.message.from_wire(reply)
            replies[answer.id] = answer
        for index, request in enumerate(requests):
            answer = replies[request.id]
            assert answer.question == request.question
            expected = dns.rcode.NOERROR if index < RATE else dns.rcode.REFUSED
            assert answer.rcode() == expected, index
        assert proxy.stats.ratelimited == 8 - RATE
        assert len(fake.queries) == RATE

        # The connection stays open, and a second later the client's queries pass again.
        await trio.sleep(1.0)
        more = _burst(RATE, "u")
        await client.send(*(r.to_wire() for r in more))
        for _ in more:
            reply = await client.receive()
            assert reply is not None
            assert dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR
    assert proxy.stats.ratelimited == 8 - RATE
    assert proxy.stats.refused == 0  # the access list's counter is another thing


async def test_udp_and_tcp_from_one_network_share_its_rate(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], ratelimit=RATE, tcp_idle_timeout=30.0)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.connect(("127.0.0.1", proxy.port))
    with trio.socket.from_stdlib_socket(plain) as sock:
        _send_burst(plain, _burst(RATE, "v"))
        assert len(await _receive_answers(sock, RATE)) == RATE
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        request = query("tcp.example.", "A")
        await client.send(request.to_wire())
        reply = await client.receive()
        assert reply is not None
        assert dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    assert proxy.stats.ratelimited == 1
