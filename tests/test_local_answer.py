"""Answers made here (core/local_answer.py), checked with dnspython."""

from __future__ import annotations

from dataclasses import dataclass

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
from hypothesis import given
from hypothesis import strategies as st

from dot_proxy.core.hosts import parse_hosts
from dot_proxy.core.local_answer import local_answer
from dot_proxy.core.local_zones import HOSTS_TTL, LOCAL_TTL, Local, Router
from dot_proxy.core.message import HEADER_SIZE, parse_query

HOSTS = "192.168.1.10 printer.home.arpa printer.lan\n" + "".join(
    f"10.0.{i // 250}.{i % 250} many.lan\n" for i in range(60)
)
ROUTER: Router[str] = Router(default="default", hosts=parse_hosts(HOSTS)[0])


@dataclass
class Exchange:
    query: dns.message.Message
    query_wire: bytes
    wire: bytes
    answer: dns.message.Message


def ask(
    name: str,
    rdtype: str = "A",
    *,
    rdclass: str = "IN",
    edns: int | None = None,
    dnssec: bool = False,
    payload: int = 1232,
    udp: bool = True,
    cd: bool = False,
    rd: bool = True,
) -> Exchange:
    query = dns.message.make_query(
        name,
        rdtype,
        rdclass,
        use_edns=False if edns is None else edns,
        want_dnssec=dnssec,
        payload=payload,
    )
    if cd:
        query.flags |= dns.flags.CD
    if not rd:
        query.flags &= ~dns.flags.RD
    query_wire = query.to_wire()
    parsed = parse_query(query_wire)
    route = ROUTER.route(parsed.question_key)
    assert isinstance(route, Local), route
    wire = local_answer(parsed, route, udp=udp)
    return Exchange(query, query_wire, wire, dns.message.from_wire(wire))


def echoes_the_query(exchange: Exchange) -> None:
    """What every local answer must do: the client's ID and question, byte for byte."""
    answer, query = exchange.answer, exchange.query
    assert answer.id == query.id
    assert answer.flags & dns.flags.QR
    assert answer.flags & dns.flags.RA
    assert bool(answer.flags & dns.flags.RD) == bool(query.flags & dns.flags.RD)
    assert bool(answer.flags & dns.flags.CD) == bool(query.flags & dns.flags.CD)
    assert answer.opcode() == dns.opcode.QUERY
    question = parse_query(exchange.query_wire).question
    assert exchange.wire[HEADER_SIZE : HEADER_SIZE + len(question)] == question
    assert query.is_response(answer) or answer.rcode() == dns.rcode.BADVERS
    assert (answer.edns >= 0) == (query.edns >= 0)


def test_a_hosts_name_answers_its_address() -> None:
    exchange = ask("Printer.Home.Arpa.")
    echoes_the_query(exchange)
    answer = exchange.answer
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.flags & dns.flags.AA
    [rrset] = answer.answer
    assert rrset.name == dns.name.from_text("printer.home.arpa.")
    assert [rdata.to_text() for rdata in rrset] == ["192.168.1.10"]
    assert rrset.ttl == HOSTS_TTL
    assert answer.authority == []
    # The owner points at the question, so the client's own case comes back there too.
    records_start = HEADER_SIZE + len(parse_query(exchange.query_wire).question)
    assert exchange.wire[records_start : records_start + 2] == b"\xc0\x0c"
    assert exchange.wire.count(b"Printer") == 1


def test_nodata_carries_the_zone_soa() -> None:
    answer = ask("printer.home.arpa.", "AAAA").answer
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer == []
    [soa] = answer.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text("home.arpa.")
    assert soa.ttl == LOCAL_TTL
    assert soa[0].to_text() == "localhost. nobody.invalid. 1 3600 1200 604800 10800"


def test_nodata_of_a_hosts_name_outside_local_zones_has_its_own_soa() -> None:
    answer = ask("PRINTER.lan.", "MX").answer
    assert answer.rcode() == dns.rcode.NOERROR
    [soa] = answer.authority
    assert soa.name == dns.name.from_text("printer.lan.")
    assert soa.ttl == HOSTS_TTL
    assert soa[0].minimum == HOSTS_TTL


def test_nxdomain_for_a_private_reverse_name() -> None:
    exchange = ask(dns.reversename.from_address("192.168.7.7").to_text(), "PTR")
    echoes_the_query(exchange)
    answer = exchange.answer
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.flags & dns.flags.AA
    [soa] = answer.authority
    assert soa.name == dns.name.from_text("168.192.in-addr.arpa.")
    assert soa.ttl == min(LOCAL_TTL, soa[0].minimum)


def test_ptr_of_a_hosts_address() -> None:
    answer = ask(dns.reversename.from_address("192.168.1.10").to_text(), "PTR").answer
    [rrset] = answer.answer
    assert [rdata.to_text() for rdata in rrset] == ["printer.home.arpa."]


def test_localhost_any_and_apex_soa() -> None:
    answer = ask("localhost.", "ANY").answer
    types = {rrset.rdtype for rrset in answer.answer}
    assert types == {dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.SOA, dns.rdatatype.NS}
    assert ask("sub.LOCALHOST.", "AAAA").answer.answer[0][0].to_text() == "::1"


def test_edns_is_echoed_only_when_sent_with_the_do_bit() -> None:
    plain = ask("printer.lan.").answer
    assert plain.edns == -1
    with_edns = ask("printer.lan.", edns=0, payload=4096).answer
    assert with_edns.edns == 0
    assert with_edns.payload == 1232
    assert not with_edns.ednsflags & dns.flags.DO
    signed = ask("printer.lan.", edns=0, dnssec=True).answer
    assert signed.ednsflags & dns.flags.DO


def test_unknown_edns_version_gets_badvers() -> None:
    exchange = ask("printer.lan.", edns=1)
    echoes_the_query(exchange)
    assert exchange.answer.rcode() == dns.rcode.BADVERS
    assert exchange.answer.edns == 0
    assert exchange.answer.answer == []


def test_zone_transfers_are_refused() -> None:
    answer = ask("home.arpa.", "AXFR").answer
    assert answer.rcode() == dns.rcode.REFUSED
    assert not answer.flags & dns.flags.AA


def test_other_classes_are_refused_in_local_zones() -> None:
    answer = ask("localhost.", rdclass="CH").answer
    assert answer.rcode() == dns.rcode.REFUSED
    assert answer.answer == answer.authority == []


def test_big_answers_are_truncated_for_udp_and_whole_over_tcp() -> None:
    small = ask("many.lan.")
    assert small.answer.flags & dns.flags.TC
    assert len(small.wire) <= 512
    assert small.answer.answer == []
    echoes_the_query(small)
    whole = ask("many.lan.", udp=False).answer
    assert not whole.flags & dns.flags.TC
    assert len(whole.answer[0]) == 60
    roomy = ask("many.lan.", edns=0, payload=4096)
    assert not roomy.answer.flags & dns.flags.TC
    assert len(roomy.wire) > 512


NAMES = st.sampled_from(
    [
        "printer.home.arpa.",
        "printer.lan.",
        "nothing.home.arpa.",
        "home.arpa.",
        "a.b.localhost.",
        "localhost.",
        "1.0.0.127.in-addr.arpa.",
        "9.9.10.in-addr.arpa.",
        "10.1.168.192.in-addr.arpa.",
        "x.onion.",
        "many.lan.",
        "0.0.127.in-addr.arpa.",
    ]
)
TYPES = st.sampled_from(["A", "AAAA", "PTR", "MX", "TXT", "SOA", "NS", "ANY", "SRV", "HTTPS"])


@st.composite
def mixed_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=True))


@given(
    NAMES.flatmap(mixed_case),
    TYPES,
    st.sampled_from([None, 0]),
    st.booleans(),
    st.integers(min_value=0, max_value=4096),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_every_local_answer_is_well_formed(
    name: str,
    rdtype: str,
    edns: int | None,
    dnssec: bool,
    payload: int,
    udp: bool,
    cd: bool,
    rd: bool,
) -> None:
    exchange = ask(
        name,
        rdtype,
        edns=edns,
        dnssec=dnssec and edns is not None,
        payload=payload,
        udp=udp,
        cd=cd,
        rd=rd,
    )
    echoes_the_query(exchange)
    answer = exchange.answer
    limit = 512 if edns is None else max(512, payload)
    if udp:
        assert len(exchange.wire) <= limit
    if answer.flags & dns.flags.TC:
        assert udp
        return
    rcode = answer.rcode()
    assert rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    assert answer.flags & dns.flags.AA
    if rcode == dns.rcode.NXDOMAIN or not answer.answer:
        # RFC 2308 §3: a negative answer carries the SOA, TTL min(TTL, MINIMUM).
        [soa] = answer.authority
        assert soa.rdtype == dns.rdatatype.SOA
        # Here the record's TTL and MINIMUM are one value (LOCAL_TTL, or HOSTS_TTL).
        assert soa.ttl == soa[0].minimum
        assert soa.ttl in (LOCAL_TTL, HOSTS_TTL)
        assert dns.name.from_text(name).is_subdomain(soa.name)
    else:
        assert answer.authority == []
        for rrset in answer.answer:
            assert rrset.name == dns.name.from_text(name)
            assert rdtype == "ANY" or rrset.rdtype == dns.rdatatype.from_text(rdtype)
