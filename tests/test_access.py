"""Who may query and how fast (issue 5 §1, and the rate limit and privilege drop of §2).

Pure tests of :class:`AccessList` and :class:`RateLimiter` (no event loop; the rate limiter's
clock is a number passed in), then the same policy through the whole proxy on loopback under
virtual time (the ``clock`` fixture of tests/conftest.py), then the command line as a subprocess.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import dot_proxy.core.access
from dot_proxy.core.access import DEFAULT_ALLOW, AccessList, RateLimiter, client_network
from tests.clients import TcpClient, query, receive_until_closed, udp_send
from tests.conftest import StartProxy, StartUpstream

ROOT = Path(__file__).resolve().parent.parent
# Bounds a broken subprocess run only; a healthy one takes a fraction of a second.
HANG_GUARD = 60.0
TIMEOUT = 5.0  # the proxy's deadline
# Bounds the wait for an answer from the subprocess proxy (well past its 5 s deadline).
ANSWER_GUARD = 15.0


# --- AccessList, pure ----------------------------------------------------------------------------

ALLOWED_BY_DEFAULT = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "192.168.255.255",
    "100.64.0.1",  # RFC 6598 shared address space (carrier-grade NAT)
    "100.127.255.254",
    "169.254.1.1",  # link-local
    "::1",
    "fc00::1",  # ULA
    "fdff:ffff::1",
    "fe80::1",  # link-local
    "febf::1",
]
DENIED_BY_DEFAULT = [
    "8.8.8.8",
    "1.1.1.1",
    "9.255.255.255",  # just below 10/8
    "11.0.0.0",  # just above
    "172.15.255.255",
    "172.32.0.0",
    "192.167.255.255",
    "192.169.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "0.0.0.0",
    "255.255.255.255",
    "2001:db8::1",
    "2606:4700:4700::1111",
    "::",
    "::2",
    "fe00::1",  # just below fc00::/7
    "fec0::1",  # site-local, deprecated: not fe80::/10
]


@pytest.mark.parametrize("host", ALLOWED_BY_DEFAULT)
def test_the_default_list_allows_loopback_and_private_networks(host: str) -> None:
    assert AccessList(DEFAULT_ALLOW).allows(host)


@pytest.mark.parametrize("host", DENIED_BY_DEFAULT)
def test_the_default_list_denies_everything_else(host: str) -> None:
    assert not AccessList(DEFAULT_ALLOW).allows(host)


def test_the_default_list_is_dnsdists() -> None:
    assert set(DEFAULT_ALLOW) == {
        "127.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    }


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("::ffff:127.0.0.1", True),  # a dual-stack socket reports IPv4 clients like this
        ("::ffff:10.1.2.3", True),
        ("::ffff:8.8.8.8", False),
        ("::ffff:192.169.0.1", False),
    ],
)
def test_ipv4_mapped_ipv6_addresses_are_judged_as_ipv4(host: str, allowed: bool) -> None:
    assert AccessList(DEFAULT_ALLOW).allows(host) is allowed


def test_an_ipv4_network_admits_its_mapped_form_too() -> None:
    access = AccessList(["8.8.8.0/24"])
    assert access.allows("8.8.8.8")
    assert access.allows("::ffff:8.8.8.8")
    assert not access.allows("::ffff:8.8.9.8")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("fe80::1%eth0", True),
        ("fe80::1%1", True),
        ("fe80::dead:beef%lo", True),
        ("2001:db8::1%eth0", False),
    ],
)
def test_a_scope_id_does_not_change_the_verdict(host: str, allowed: bool) -> None:
    assert AccessList(DEFAULT_ALLOW).allows(host) is allowed


@pytest.mark.parametrize("host", ["", "localhost", "not an address", "10.0.0.256", "::g", "%eth0"])
def test_what_is_not_an_address_is_denied(host: str) -> None:
    assert not AccessList(["0.0.0.0/0", "::/0"]).allows(host)


def test_host_bits_in_a_network_are_ignored() -> None:
    access = AccessList(["10.1.2.3/24"])
    assert access.allows("10.1.2.200")
    assert not access.allows("10.1.3.1")


@pytest.mark.parametrize(
    ("networks", "is_open"),
    [
        (["0.0.0.0/0"], True),
        (["::/0"], True),
        (["0.0.0.0/0", "::/0"], True),
        (["10.0.0.0/8", "::/0"], True),
        (["1.2.3.4/0"], True),  # host bits do not hide it
        (list(DEFAULT_ALLOW), False),
        (["0.0.0.0/1"], False),
        (["::/1"], False),
    ],
)
def test_is_open_when_every_ipv4_or_every_ipv6_address_is_allowed(
    networks: list[str], is_open: bool
) -> None:
    assert AccessList(networks).is_open is is_open


def test_an_open_list_allows_anything() -> None:
    access = AccessList(["0.0.0.0/0", "::/0"])
    assert all(access.allows(host) for host in ALLOWED_BY_DEFAULT + DENIED_BY_DEFAULT)


def test_an_empty_list_allows_nothing() -> None:
    access = AccessList([])
    assert not access.is_open
    assert not any(access.allows(host) for host in ALLOWED_BY_DEFAULT)


def test_the_verdict_cache_is_bounded_and_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dot_proxy.core.access, "_MAX_TRACKED", 100)
    access = AccessList(["10.0.0.0/16"])
    for round_ in range(3):
        for index in range(1000):  # a scan of spoofed sources, half inside, half outside
            host = f"10.{index % 2}.{index // 256}.{index % 256}"
            assert access.allows(host) is (index % 2 == 0), (round_, host)
            assert len(access._verdicts) <= 100


@given(st.ip_addresses())
def test_verdicts_agree_with_the_ipaddress_module(address: object) -> None:
    host = str(address)
    expected = any(
        ipaddress.ip_address(host) in ipaddress.ip_network(network) for network in DEFAULT_ALLOW
    )
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        expected = any(mapped in ipaddress.ip_network(network) for network in DEFAULT_ALLOW)
    access = AccessList(DEFAULT_ALLOW)
    assert access.allows(host) is expected
    assert access.allows(host) is expected  # cached the same


def test_the_access_module_is_pure() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys, dot_proxy.core.access; print('trio' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD,
    )
    assert result.stdout.strip() == "False"


# --- RateLimiter, pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "network"),
    [
        ("10.1.2.3", "10.1.2.0/24"),
        ("10.1.2.255", "10.1.2.0/24"),
        ("::ffff:10.1.2.3", "10.1.2.0/24"),
        ("2001:db8:1:2ff:1:2:3:4", "2001:db8:1:200::/56"),
        ("2001:db8:1:200::", "2001:db8:1:200::/56"),
        ("fe80::1%eth0", "fe80::/56"),
    ],
)
def test_clients_are_limited_per_24_or_56(host: str, network: str) -> None:
    assert client_network(host) == network


@pytest.mark.parametrize("rate", [0, -1, -0.5])
def test_the_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rate)


@pytest.mark.parametrize("rate", [1, 5, 100])
def test_rate_n_allows_n_at_once_and_no_more(rate: int) -> None:
    limiter = RateLimiter(rate)
    assert [limiter.allow("192.0.2.1", 100.0) for _ in range(rate + 3)] == [True] * rate + [
        False
    ] * 3
    assert limiter.limited == 3


def test_one_network_shares_a_bucket_and_others_are_independent() -> None:
    limiter = RateLimiter(5)
    now = 7.0
    assert sum(limiter.allow(f"192.0.2.{n}", now) for n in range(10)) == 5  # one /24
    assert not limiter.allow("192.0.2.77", now)
    assert sum(limiter.allow("192.0.3.1", now) for _ in range(10)) == 5  # the next /24
    assert sum(limiter.allow("::ffff:198.51.100.7", now) for _ in range(10)) == 5
    assert not limiter.allow("198.51.100.8", now)  # the same /24 as the mapped one
    # IPv6: a /56 is one client network; the next /56 is another.
    assert sum(limiter.allow(f"2001:db8:0:{n:x}::1", now) for n in range(0, 256, 25)) == 5
    assert limiter.allow("2001:db8:0:100::1", now)
    assert limiter.limited == 5 + 1 + 5 + 5 + 1 + 6


def test_tokens_refill_at_the_rate_and_the_burst_is_capped() -> None:
    limiter = RateLimiter(5)
    host = "203.0.113.9"
    assert sum(limiter.allow(host, 0.0) for _ in range(5)) == 5
    assert not limiter.allow(host, 0.0)
    assert not limiter.allow(host, 0.1)  # half a token
    assert limiter.allow(host, 0.25)  # 0.25 s at 5/s: one and a quarter tokens
    assert not limiter.allow(host, 0.25)
    # A long silence refills one second's worth, never more.
    assert sum(limiter.allow(host, 3600.0) for _ in range(50)) == 5
    # After a second, the full rate again.
    assert sum(limiter.allow(host, 3601.0) for _ in range(50)) == 5


def test_not_an_address_is_never_admitted() -> None:
    limiter = RateLimiter(5)
    assert not limiter.allow("not an address", 0.0)


def test_the_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dot_proxy.core.access, "_MAX_TRACKED", 100)
    limiter = RateLimiter(1)
    for index in range(2000):
        limiter.allow(f"10.{index // 256}.{index % 256}.1", 0.0)
        assert len(limiter._buckets) <= 100
        assert len(limiter._networks) <= 100


gaps = st.lists(st.floats(min_value=0.0, max_value=2.0, allow_nan=False), max_size=200)
rates = st.sampled_from([1.0, 2.0, 5.0, 10.0, 1000.0])


@given(rates, gaps)
def test_no_window_admits_more_than_the_rate_allows(rate: float, steps: list[float]) -> None:
    # Token bucket: over any interval [a, b], at most rate * (b - a) + rate queries (one
    # second's burst) get through.
    limiter = RateLimiter(rate)
    now, admitted = 0.0, []
    for step in steps:
        now += step
        if limiter.allow("192.0.2.1", now):
            admitted.append(now)
    for first in range(len(admitted)):
        for last in range(first, len(admitted)):
            span = admitted[last] - admitted[first]
            assert last - first + 1 <= rate * span + rate + 1e-6


@given(rates, st.lists(st.floats(min_value=0.0, max_value=0.5), max_size=100))
def test_a_client_within_the_rate_is_never_limited(rate: float, extra: list[float]) -> None:
    limiter = RateLimiter(rate)
    now = 0.0
    for slack in extra:
        now += (1.0 + 1e-9) / rate + slack / rate  # never faster than the rate
        assert limiter.allow("2001:db8::1", now)
    assert limiter.limited == 0


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=0.5)), max_size=150))
def test_networks_do_not_affect_each_other(trace: list[tuple[bool, float]]) -> None:
    # Network A's verdicts are the same whether or not network B queries in between.
    alone, shared = RateLimiter(3), RateLimiter(3)
    now = 0.0
    for from_a, step in trace:
        now += step
        if from_a:
            assert alone.allow("192.0.2.1", now) == shared.allow("192.0.2.2", now)
        else:
            shared.allow("198.51.100.1", now)


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


# --- the command line ----------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOT_PROXY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dot_proxy", "--listen", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allow", "bogus"], "--allow"),
        (["--allow", "10.0.0.0/33"], "--allow"),
        (["--allow", "10.0.0.0/8", "--allow", "::/0/1"], "--allow"),
        (["--ratelimit", "-1"], "--ratelimit"),
        (["--ratelimit", "nan"], "--ratelimit"),
        (["--ratelimit", "inf"], "--ratelimit"),
        (["--ratelimit", "fast"], "--ratelimit"),
        (["--max-tcp-clients", "0"], "--max-tcp-clients"),
        (["--max-in-flight", "0"], "--max-in-flight"),
        (["--tcp-idle-timeout", "0"], "--tcp-idle-timeout"),
        (["--user", "nosuchuser-dot-proxy"], "--user"),
    ],
)
def test_a_bad_access_or_limit_setting_exits_2_with_one_line(args: list[str], needle: str) -> None:
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert needle in line
    assert result.stdout == ""


@pytest.fixture
def refusing_upstream() -> Iterator[str]:
    """An upstream spec for a loopback port bound but not listening: connect is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}#dns.test"


def _status(pid: int) -> dict[str, list[int]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(part) for part in value.split()]
    return fields


def _udp_ask(port: int, request: dns.message.Message) -> dns.message.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(ANSWER_GUARD)
        client.sendto(request.to_wire(), ("127.0.0.1", port))
        return dns.message.from_wire(client.recv(65535))


def _tcp_ask(port: int, request: dns.message.Message) -> dns.message.Message:
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_GUARD) as client:
        wire = request.to_wire()
        client.sendall(len(wire).to_bytes(2, "big") + wire)
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = client.recv(65535)
            assert chunk, "closed before the answer"
            data += chunk
        return dns.message.from_wire(data[2:])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user")
def test_as_root_with_user_it_binds_then_serves_as_that_user(refusing_upstream: str) -> None:
    nobody = pwd.getpwnam("nobody")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dot_proxy",
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--upstream",
            refusing_upstream,
            "--user",
            "nobody",
        ],
        cwd=ROOT,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        port = None
        while port is None:
            line = lines.get(timeout=HANG_GUARD)
            assert line is not None, "exited before listening:\n" + "".join(seen)
            seen.append(line)
            if found := re.search(r"listening on udp 127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
        status = _status(process.pid)
        assert status["Uid"] == [nobody.pw_uid] * 4  # real, effective, saved, filesystem
        assert status["Gid"] == [nobody.pw_gid] * 4
        assert status["Groups"] == []  # root's supplementary groups are gone too
        # It serves, as that user: the upstream refuses, so each query gets SERVFAIL at once.
        for ask in (_udp_ask, _tcp_ask, _udp_ask):
            request = query("as-nobody.example.", "A")
            answer = ask(port, request)
            assert answer.id == request.id
            assert answer.rcode() == dns.rcode.SERVFAIL
        assert process.poll() is None, "".join(seen)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_GUARD) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=HANG_GUARD)
        while not lines.empty():
            if (line := lines.get()) is not None:
                seen.append(line)
        if process.stderr is not None:
            process.stderr.close()
    assert any("running as user nobody" in line for line in seen), "".join(seen)
    assert not any("Traceback" in line for line in seen), "".join(seen)
