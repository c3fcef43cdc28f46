"""Where a query goes (core/local_zones.py): hosts, forward zones, the built-in local zones."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dot_proxy.core.hosts import parse_hosts
from dot_proxy.core.local_zones import (
    BUILTIN_NETWORKS,
    HOSTS_TTL,
    LOCAL_TTL,
    Forward,
    Local,
    Router,
    builtin_zone_names,
    reverse_zones,
)
from dot_proxy.core.message import parse_query
from dot_proxy.core.zones import ROOT, name_to_wire

NOERROR, NXDOMAIN, REFUSED = 0, 3, 5


def key(name: str, rdtype: str = "A", rdclass: str = "IN") -> bytes:
    """A query's question_key, as parse_query makes it (name lower-cased)."""
    query = dns.message.make_query(name, rdtype, rdclass)
    return parse_query(query.to_wire()).question_key


def rev(address: str) -> str:
    text: str = dns.reversename.from_address(address).to_text()
    return text


def router(
    *, forwards: dict[str, str] | None = None, hosts: str = "", local_zones: bool = True
) -> Router[str]:
    table, problems = parse_hosts(hosts)
    assert not problems
    return Router(
        default="default",
        forwards={name_to_wire(zone): target for zone, target in (forwards or {}).items()},
        hosts=table,
        local_zones=local_zones,
    )


def local(route: Forward[str] | Local) -> Local:
    assert isinstance(route, Local), route
    return route


def target(route: Forward[str] | Local) -> str:
    assert isinstance(route, Forward), route
    return route.target


# --- the built-in list --------------------------------------------------------------------------


def test_the_built_in_list() -> None:
    names = builtin_zone_names()
    for expected in [
        "localhost.",
        "10.in-addr.arpa.",
        "16.172.in-addr.arpa.",
        "31.172.in-addr.arpa.",
        "168.192.in-addr.arpa.",
        "64.100.in-addr.arpa.",
        "127.100.in-addr.arpa.",
        "254.169.in-addr.arpa.",
        "127.in-addr.arpa.",
        "0.in-addr.arpa.",
        "2.0.192.in-addr.arpa.",
        "100.51.198.in-addr.arpa.",
        "113.0.203.in-addr.arpa.",
        "255.255.255.255.in-addr.arpa.",
        "c.f.ip6.arpa.",
        "d.f.ip6.arpa.",
        "8.e.f.ip6.arpa.",
        "b.e.f.ip6.arpa.",
        "8.b.d.0.1.0.0.2.ip6.arpa.",
        rev("::1"),
        rev("::"),
        "home.arpa.",
        "local.",
        "invalid.",
        "onion.",
    ]:
        assert expected in names
    for forwarded in [
        "test.",
        "example.",
        "15.172.in-addr.arpa.",
        "32.172.in-addr.arpa.",
        "63.100.in-addr.arpa.",
        "128.100.in-addr.arpa.",
        "e.f.ip6.arpa.",
    ]:
        assert forwarded not in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize("network", BUILTIN_NETWORKS)
@given(offset=st.integers(min_value=0))
def test_reverse_zones_cover_the_network_exactly(network: str, offset: int) -> None:
    net = ipaddress.ip_network(network)
    zones = [dns.name.from_text(zone) for zone in reverse_zones(network)]
    inside = net.network_address + offset % net.num_addresses
    first, last = int(net.network_address), int(net.broadcast_address)
    top = 2**net.max_prefixlen - 1
    outside = [
        ipaddress.ip_address(value) if net.version == 4 else ipaddress.IPv6Address(value)
        for value in (first - 1, last + 1)
        if 0 <= value <= top
    ]
    under = [z for z in zones if dns.reversename.from_address(str(inside)).is_subdomain(z)]
    assert len(under) == 1
    for address in outside:
        name = dns.reversename.from_address(str(address))
        assert not any(name.is_subdomain(zone) for zone in zones)


def test_reverse_zones_of_unaligned_prefixes() -> None:
    assert reverse_zones("172.16.0.0/12") == [f"{n}.172.in-addr.arpa." for n in range(16, 32)]
    assert reverse_zones("fe80::/10") == [f"{n}.e.f.ip6.arpa." for n in "89ab"]
    assert reverse_zones("fc00::/7") == ["c.f.ip6.arpa.", "d.f.ip6.arpa."]
    assert reverse_zones("3fff::/20") == ["0.f.f.f.3.ip6.arpa."]


# --- routing ------------------------------------------------------------------------------------


def test_private_reverse_names_never_leave() -> None:
    answer = local(router().route(key(rev("192.168.1.20"), "PTR")))
    assert answer.rcode == NXDOMAIN
    assert answer.soa is not None
    assert answer.soa.apex == name_to_wire("168.192.in-addr.arpa")
    assert answer.soa.ttl == LOCAL_TTL
    for address in [
        "10.1.2.3",
        "172.20.0.1",
        "100.64.0.1",
        "169.254.1.1",
        "fd12::1",
        "fe80::1",
        "2001:db8::1",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
    ]:
        assert local(router().route(key(rev(address), "PTR"))).rcode == NXDOMAIN, address


def test_public_and_reserved_for_testing_names_are_forwarded() -> None:
    routes = router()
    for name in [
        "example.com",
        "test.",
        "www.example.",
        rev("8.8.8.8"),
        rev("2606:4700::1111"),
        "xlocal.",
        "localhostx.",
        "notonion.",
        "arpa.",
        "in-addr.arpa.",
    ]:
        assert target(routes.route(key(name))) == "default", name


def test_special_use_names_answer_nxdomain() -> None:
    routes = router()
    for name in [
        "printer.home.arpa.",
        "myhost.local.",
        "x.invalid.",
        "duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion.",
    ]:
        answer = local(routes.route(key(name)))
        assert answer.rcode == NXDOMAIN, name
    # The apex exists (it holds the SOA and NS), so other types there are NODATA.
    apex = local(routes.route(key("invalid.", "A")))
    assert apex.rcode == NOERROR
    assert {rtype for rtype, _ in apex.rrsets} == {2, 6}


def test_zone_apexes_hold_soa_and_ns() -> None:
    answer = local(router().route(key("home.arpa.", "SOA")))
    assert answer.rcode == NOERROR
    assert {rtype for rtype, _ in answer.rrsets} == {6, 2}


def test_localhost_and_names_under_it_are_loopback() -> None:
    routes = router()
    for name in ["localhost.", "LocalHost.", "a.b.localhost."]:
        answer = local(routes.route(key(name)))
        rrsets = dict(answer.rrsets)
        assert rrsets[1] == (bytes([127, 0, 0, 1]),)
        assert rrsets[28] == (ipaddress.IPv6Address("::1").packed,)
    assert local(routes.route(key("localhost.", "SOA"))).rrsets[0][0] == 6


def test_loopback_addresses_have_ptr_localhost() -> None:
    routes = router()
    for address in ["127.0.0.1", "::1"]:
        answer = local(routes.route(key(rev(address), "PTR")))
        assert dict(answer.rrsets)[12] == (name_to_wire("localhost"),)
    assert local(routes.route(key(rev("127.0.0.2"), "PTR"))).rcode == NXDOMAIN
    # 0.0.127.in-addr.arpa has 1.0.0.127 below it: it exists, empty (RFC 8020).
    empty = local(routes.route(key("0.0.127.in-addr.arpa.", "PTR")))
    assert (empty.rcode, empty.rrsets) == (NOERROR, ())


def test_a_forward_zone_overrides_the_built_in_zone_it_equals_or_is_under() -> None:
    routes = router(forwards={"168.192.in-addr.arpa": "router", "1.10.in-addr.arpa.": "vpn"})
    assert target(routes.route(key(rev("192.168.1.20"), "PTR"))) == "router"
    assert target(routes.route(key(rev("10.1.2.3"), "PTR"))) == "vpn"
    assert local(routes.route(key(rev("10.2.2.3"), "PTR"))).rcode == NXDOMAIN


def test_a_forward_zone_above_a_built_in_zone_leaves_it_local() -> None:
    routes = router(forwards={"in-addr.arpa": "reverse", ".": "root"})
    assert local(routes.route(key(rev("10.1.2.3"), "PTR"))).rcode == NXDOMAIN
    assert target(routes.route(key(rev("8.8.8.8"), "PTR"))) == "reverse"
    assert target(routes.route(key("example.com"))) == "root"


def test_the_longest_forward_zone_wins() -> None:
    routes = router(forwards={"example": "outer", "corp.example": "inner"})
    assert target(routes.route(key("a.corp.example."))) == "inner"
    assert target(routes.route(key("a.other.example."))) == "outer"
    assert target(routes.route(key("xcorp.example."))) == "outer"
    forward = routes.route(key("A.Corp.Example."))
    assert isinstance(forward, Forward)
    assert forward.zone == name_to_wire("corp.example")
    default = routes.route(key("example.com."))
    assert isinstance(default, Forward)
    assert default.zone == ROOT


HOSTS = """\
192.168.1.10 printer.home.arpa printer.lan
10.0.0.5 a.b.home.arpa
203.0.113.80 www.corp.example
"""


def test_hosts_entries_win_over_local_and_forward_zones() -> None:
    routes = router(forwards={"corp.example": "vpn"}, hosts=HOSTS)
    printer = local(routes.route(key("printer.home.arpa.")))
    assert dict(printer.rrsets)[1] == (bytes([192, 168, 1, 10]),)
    assert printer.ttl == HOSTS_TTL
    # Inside a local zone, its negative answers carry the zone's SOA.
    assert printer.soa is not None
    assert printer.soa.apex == name_to_wire("home.arpa")
    assert local(routes.route(key(rev("192.168.1.10"), "PTR"))).rrsets == (
        (12, (name_to_wire("printer.home.arpa"),)),
    )
    assert local(routes.route(key(rev("192.168.1.11"), "PTR"))).rcode == NXDOMAIN
    www = local(routes.route(key("WWW.corp.example.")))
    assert www.soa is not None
    assert www.soa.apex is None  # outside the local zones: its own SOA
    assert target(routes.route(key("mail.corp.example."))) == "vpn"
    # Other names under a hosts name are not listed: NXDOMAIN in a local zone.
    assert local(routes.route(key("x.printer.home.arpa."))).rcode == NXDOMAIN
    # b.home.arpa has a.b.home.arpa below it: empty, not NXDOMAIN (RFC 8020).
    empty = local(routes.route(key("b.home.arpa.")))
    assert (empty.rcode, empty.rrsets) == (NOERROR, ())


def test_hosts_names_keep_their_type_set() -> None:
    routes = router(hosts="192.168.1.10 printer.lan\n")
    answer = local(routes.route(key("printer.lan.", "MX")))
    types = {rtype for rtype, _ in answer.rrsets}
    assert types == {1, 6}  # A, and the SOA the name owns as its own apex
    assert answer.rcode == NOERROR


def test_classes_other_than_in() -> None:
    routes = router(hosts="192.168.1.10 printer.lan\n")
    assert local(routes.route(key(rev("10.0.0.1"), "PTR", "CH"))).rcode == REFUSED
    assert local(routes.route(key("localhost.", "A", "CH"))).rcode == REFUSED
    assert target(routes.route(key("printer.lan.", "TXT", "CH"))) == "default"
    assert local(routes.route(key("printer.lan.", "A", "ANY"))).rcode == NOERROR


def test_no_local_zones_forwards_everything_but_hosts() -> None:
    routes = router(local_zones=False, hosts="192.168.1.10 printer.home.arpa\n")
    assert target(routes.route(key(rev("10.1.2.3"), "PTR"))) == "default"
    assert target(routes.route(key("localhost."))) == "default"
    printer = local(routes.route(key("printer.home.arpa.")))
    assert printer.soa is not None
    assert printer.soa.apex is None
    assert local(routes.route(key(rev("192.168.1.10"), "PTR"))).rcode == NOERROR


def test_routes_are_made_once() -> None:
    routes = router(hosts=HOSTS)
    for name in ["printer.lan.", rev("10.9.9.9"), "localhost.", "example.com."]:
        assert routes.route(key(name)) is routes.route(key(name))


@given(st.from_regex(r"[a-zA-Z0-9-]{1,10}(\.[a-zA-Z0-9-]{1,10}){0,3}", fullmatch=True))
def test_every_name_gets_exactly_one_route(label: str) -> None:
    routes = router(hosts=HOSTS, forwards={"lan": "lan"})
    for suffix in ["", ".home.arpa", ".lan", ".localhost", ".10.in-addr.arpa", ".com"]:
        name = label + suffix + "."
        route = routes.route(key(name))
        if suffix in (".home.arpa", ".localhost", ".10.in-addr.arpa"):
            assert isinstance(route, Local)
        elif suffix == ".lan" and name.lower() != "printer.lan.":
            assert isinstance(route, Forward)
            assert route.target == "lan"
        elif suffix == ".com":  # under no zone and no hosts name: the default upstreams
            assert isinstance(route, Forward)
            assert route.target == "default"


@given(
    st.lists(st.from_regex(r"[a-z0-9]{1,4}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True), max_size=4),
    st.from_regex(r"[a-z0-9]{1,4}(\.[a-z0-9]{1,4}){0,3}", fullmatch=True),
)
def test_the_quick_turn_away_never_changes_a_route(zones: list[str], name: str) -> None:
    # Router.route turns a name under none of the tables' top-level domains away with one
    # endswith; a router without that shortcut must route every name the same.
    routes = router(hosts=HOSTS, forwards={zone: zone for zone in zones})
    slow = router(hosts=HOSTS, forwards={zone: zone for zone in zones})
    slow._reject = None
    for rdtype in ("A", "PTR"):
        assert routes.route(key(name + ".", rdtype)) == slow.route(key(name + ".", rdtype))


def test_a_router_with_no_zone_and_no_host_sends_everything_to_the_default() -> None:
    routes = router(local_zones=False)
    assert target(routes.route(key("localhost."))) == "default"
    assert target(routes.route(key("1.1.168.192.in-addr.arpa.", "PTR"))) == "default"
