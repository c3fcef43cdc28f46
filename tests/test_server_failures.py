"""Every client gets an answer: hangs, refused connections, TLS failures, broken streams."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing
import trustme

from tests.clients import query, tcp_exchange, udp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    AUTH_NAME,
    FakeUpstream,
    answer_after,
    close_mid_frame,
    hang,
)

EXCHANGES = [pytest.param(udp_exchange, id="udp"), pytest.param(tcp_exchange, id="tcp")]
TIMEOUT = 5.0
# What "promptly" means for failures that need no waiting: far less than the deadline, on the
# MockClock (virtual time moves only when every task waits for a timer).
PROMPTLY = 1.0


@dataclass
class ClosedPort:
    """An upstream spec for a loopback port where nothing listens: connect is refused.

    The port stays bound (without listen()) for the test, so no one else can take it.
    """

    spec: str


@pytest.fixture
def closed_port() -> Iterator[ClosedPort]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield ClosedPort(f"127.0.0.1:{sock.getsockname()[1]}#{AUTH_NAME}")


def assert_servfail_for(reply: bytes | None, request: dns.message.Message) -> None:
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert answer.id == request.id
    assert answer.question == request.question
    assert answer.answer == []


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_hanging_upstream_gives_servfail_at_the_deadline(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
    exchange: object,
) -> None:
    upstream = await start_upstream(hang)
    proxy = await start_proxy([upstream], timeout=TIMEOUT)
    request = query("slow.example.", "A")
    start = trio.current_time()
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert_servfail_for(reply, request)
    assert trio.current_time() - start == pytest.approx(TIMEOUT, abs=0.01)
    assert proxy.stats.timeouts == 1


@pytest.mark.parametrize("delay", [1.5, 2.5, 4.5])
async def test_slow_upstream_answer_within_the_deadline_is_passed_on(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
    delay: float,
) -> None:
    # A recursive resolver may take seconds on a cold name: as long as it answers within the
    # deadline the client gets that answer, not SERVFAIL.
    upstream = await start_upstream(answer_after(delay))
    proxy = await start_proxy([upstream], timeout=TIMEOUT)
    request = query("cold.example.", "A")
    start = trio.current_time()
    answer = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.id == request.id
    assert str(answer.answer[0][0]) == "192.0.2.1"
    assert trio.current_time() - start < TIMEOUT


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_refused_connection_gives_servfail_promptly(
    hang_guard: None,
    start_proxy: StartProxy,
    closed_port: ClosedPort,
    clock: trio.testing.MockClock,
    exchange: object,
) -> None:
    proxy = await start_proxy([closed_port], timeout=TIMEOUT)
    request = query("example.com.", "A")
    start = trio.current_time()
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert_servfail_for(reply, request)
    assert trio.current_time() - start < PROMPTLY


async def _untrusted_ca_upstream(ca: trustme.CA, nursery: trio.Nursery) -> FakeUpstream:
    upstream = FakeUpstream(trustme.CA())  # a CA the proxy does not trust
    await nursery.start(upstream.serve)
    return upstream


async def _wrong_name_upstream(ca: trustme.CA, nursery: trio.Nursery) -> FakeUpstream:
    upstream = FakeUpstream(ca, names=("other.test", "127.0.0.2"))  # trusted CA, wrong name
    await nursery.start(upstream.serve)
    return upstream


BAD_CERTIFICATES = [
    pytest.param(_untrusted_ca_upstream, id="untrusted-ca"),
    pytest.param(_wrong_name_upstream, id="wrong-name"),
]


@pytest.mark.parametrize("make_upstream", BAD_CERTIFICATES)
@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_tls_failure_gives_servfail_and_sends_no_query_bytes(
    hang_guard: None,
    start_proxy: StartProxy,
    ca: trustme.CA,
    nursery: trio.Nursery,
    clock: trio.testing.MockClock,
    make_upstream: object,
    exchange: object,
) -> None:
    upstream = await make_upstream(ca, nursery)  # type: ignore[operator]
    proxy = await start_proxy([upstream], timeout=TIMEOUT)
    request = query("secret.example.", "A")
    start = trio.current_time()
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert_servfail_for(reply, request)
    assert trio.current_time() - start < PROMPTLY
    assert upstream.connections >= 1  # it was dialled ...
    assert upstream.handshakes == 0  # ... the handshake failed ...
    assert upstream.queries == []  # ... and not one byte of the query was sent
    assert upstream.received_bytes == []


async def test_certificate_must_match_the_address_when_no_name_is_given(
    hang_guard: None, start_proxy: StartProxy, ca: trustme.CA, nursery: trio.Nursery
) -> None:
    with_address = FakeUpstream(ca, names=(AUTH_NAME, "127.0.0.1"))
    without_address = FakeUpstream(ca, names=(AUTH_NAME,))
    for upstream in (with_address, without_address):
        await nursery.start(upstream.serve)
    request = query("example.com.", "A")

    @dataclass
    class AddressOnly:
        spec: str

    good = await start_proxy([AddressOnly(f"127.0.0.1:{with_address.port}")])
    answer = dns.message.from_wire(await udp_exchange(good.port, request.to_wire()))
    assert answer.rcode() == dns.rcode.NOERROR
    bad = await start_proxy([AddressOnly(f"127.0.0.1:{without_address.port}")])
    assert_servfail_for(await udp_exchange(bad.port, request.to_wire()), request)
    assert without_address.queries == []


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_upstream_closing_mid_frame_is_retried_once(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
    exchange: object,
) -> None:
    upstream = await start_upstream(close_mid_frame(times=1))
    proxy = await start_proxy([upstream], timeout=TIMEOUT)
    request = query("example.com.", "A")
    start = trio.current_time()
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.id == request.id
    assert str(answer.answer[0][0]) == "192.0.2.1"
    assert trio.current_time() - start < PROMPTLY
    assert upstream.handshakes == 2
    assert len(upstream.queries) == 2


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_upstream_closing_mid_frame_twice_gives_servfail(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    clock: trio.testing.MockClock,
    exchange: object,
) -> None:
    upstream = await start_upstream(close_mid_frame(times=100))
    proxy = await start_proxy([upstream], timeout=TIMEOUT)
    request = query("example.com.", "A")
    start = trio.current_time()
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert_servfail_for(reply, request)
    assert trio.current_time() - start < PROMPTLY
    assert len(upstream.queries) == 2  # the query and its one retry


async def test_failover_past_a_refusing_and_an_untrusted_upstream(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    closed_port: ClosedPort,
    ca: trustme.CA,
    nursery: trio.Nursery,
    clock: trio.testing.MockClock,
) -> None:
    untrusted = await _untrusted_ca_upstream(ca, nursery)
    wrong_name = await _wrong_name_upstream(ca, nursery)
    good = await start_upstream()
    proxy = await start_proxy([closed_port, untrusted, wrong_name, good], timeout=TIMEOUT)
    for exchange in (udp_exchange, tcp_exchange):
        request = query("example.com.", "A")
        start = trio.current_time()
        reply = await exchange(proxy.port, request.to_wire())
        assert reply is not None
        answer = dns.message.from_wire(reply)
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.id == request.id
        assert trio.current_time() - start < PROMPTLY
    assert untrusted.queries == wrong_name.queries == []
    assert len(good.queries) == 2


@pytest.mark.parametrize("first", ["refused", "untrusted-ca", "wrong-name"])
async def test_second_upstream_answers_when_the_first_fails(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    closed_port: ClosedPort,
    ca: trustme.CA,
    nursery: trio.Nursery,
    first: str,
) -> None:
    failing: object
    if first == "refused":
        failing = closed_port
    elif first == "untrusted-ca":
        failing = await _untrusted_ca_upstream(ca, nursery)
    else:
        failing = await _wrong_name_upstream(ca, nursery)
    good = await start_upstream()
    proxy = await start_proxy([failing, good])
    request = query("example.com.", "A")
    answer = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    assert answer.rcode() == dns.rcode.NOERROR
    assert str(answer.answer[0][0]) == "192.0.2.1"
    assert len(good.queries) == 1
