"""Who may query and how fast, in the pure core: :class:`AccessList` and :class:`RateLimiter`
(issue 5 §1 and §2's rate limit), with no event loop; the rate limiter's clock is a number
passed in. The same policy through the proxy: tests/test_access_proxy.py; its command-line
settings and the privilege drop: tests/test_access_cli.py.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dot_proxy.core.access
from dot_proxy.core.access import DEFAULT_ALLOW, AccessList, RateLimiter, client_network

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
