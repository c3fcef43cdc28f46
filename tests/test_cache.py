"""Pure tests of :mod:`dot_proxy.core.cache`: no event loop, dnspython as the oracle.

Answers are made by dnspython, stored, served back at chosen ages, and read by dnspython again:
what a client sees is checked field by field against the RFCs the module cites.
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dot_proxy.core.cache import (
    STALE_TTL,
    AnswerCache,
    CachedAnswer,
    cache_key,
    make_entry,
)
from dot_proxy.core.message import HEADER_SIZE, Query, parse_query, record_at
from tests.test_wire import dns_names, queries, to_wire

SOME = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AD = int(dns.flags.AD)
RD = int(dns.flags.RD)
CD = int(dns.flags.CD)
AA = int(dns.flags.AA)
TC = int(dns.flags.TC)


def query(
    name: str = "www.example.com.",
    rdtype: str = "A",
    *,
    edns: bool = False,
    dnssec: bool = False,
    msg_id: int = 0x4242,
    flags: int = RD,
    options: list[dns.edns.Option] | None = None,
    payload: int = 1232,
) -> dns.message.QueryMessage:
    return dns.message.make_query(
        name,
        rdtype,
        use_edns=0 if edns or dnssec or options else False,
        want_dnssec=dnssec,
        id=msg_id,
        flags=flags,
        options=options,
        payload=payload,
    )


def parsed(message: dns.message.Message) -> tuple[bytes, Query]:
    wire = to_wire(message)
    return wire, parse_query(wire)


def answer_to(
    message: dns.message.Message,
    *records: str,
    rcode: int = dns.rcode.NOERROR,
    authority: tuple[str, ...] = (),
    ttl: int = 300,
    edns: bool = True,
    options: list[dns.edns.Option] | None = None,
) -> bytes:
    """An upstream's answer to ``message``: each record as 'TYPE RDATA' for the question's name."""
    response = dns.message.make_response(message)
    response.set_rcode(rcode)
    name = message.question[0].name
    for record in records:
        rdtype, _, rdata = record.partition(" ")
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, rdata))
    for record in authority:
        owner, rttl, rdtype, rdata = record.split(" ", 3)
        response.authority.append(dns.rrset.from_text(owner, int(rttl), "IN", rdtype, rdata))
    if edns:
        response.use_edns(0, 0, 1232, options=options or [])
    else:
        response.use_edns(False)
    return to_wire(response)


SOA = "example.com. {ttl} SOA ns.example.com. host.example.com. 1 7200 900 1209600 {minimum}"


def soa(ttl: int = 3600, minimum: int = 60) -> str:
    return SOA.format(ttl=ttl, minimum=minimum)


def entry_for(
    answer: bytes,
    question: Query,
    *,
    now: float = 100.0,
    min_ttl: int = 0,
    max_ttl: int = 86400,
    serve_stale: float = 0.0,
) -> CachedAnswer | None:
    return make_entry(
        answer,
        HEADER_SIZE + len(question.question),
        now=now,
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        serve_stale=serve_stale,
    )


def stored(answer: bytes, question: Query, **kwargs: float) -> CachedAnswer:
    entry = entry_for(answer, question, **kwargs)  # type: ignore[arg-type]
    assert entry is not None
    return entry


def ttls(wire: bytes) -> list[int]:
    message = dns.message.from_wire(wire)
    return [rrset.ttl for section in message.sections[1:] for rrset in section]


# --- the key ---------------------------------------------------------------------------------


def test_key_ignores_letter_case_and_whether_edns_was_sent() -> None:
    plain = cache_key(parsed(query("WWW.Example.COM."))[1])
    edns = cache_key(parsed(query("www.example.com.", edns=True))[1])
    assert plain is not None
    assert plain == edns


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"dnssec": True}, {"edns": True}),  # DO=1 and DO=0 make their own entries
        ({"flags": RD | CD}, {"flags": RD}),  # so do CD=1 and CD=0
        ({"rdtype": "AAAA"}, {"rdtype": "A"}),
        ({"name": "example.com."}, {"name": "www.example.com."}),
    ],
)
def test_key_separates_what_changes_the_answer(
    first: dict[str, object], second: dict[str, object]
) -> None:
    assert cache_key(parsed(query(**first))[1]) != cache_key(parsed(query(**second))[1])  # type: ignore[arg-type]


def test_a_query_with_client_subnet_bypasses_the_cache() -> None:
    ecs = dns.edns.ECSOption("192.0.2.0", 24)
    assert cache_key(parsed(query(options=[ecs]))[1]) is None


def test_with_client_subnet_stripped_a_query_shares_the_entry_of_one_without() -> None:
    # What the proxy does by default (RFC 7871 §11.1): the option never leaves, so the answer
    # is everyone's, cached under the same key as the question asked without it.
    ecs = dns.edns.ECSOption("192.0.2.0", 24)
    cookie = dns.edns.CookieOption(b"\x01" * 8, b"")
    plain = cache_key(parsed(query())[1])
    assert plain is not None
    assert cache_key(parsed(query(options=[ecs]))[1], ecs_stripped=True) == plain
    assert cache_key(parsed(query(options=[cookie, ecs]))[1], ecs_stripped=True) == plain
    dnssec = parsed(query(options=[ecs], dnssec=True))[1]
    assert cache_key(dnssec, ecs_stripped=True) == cache_key(parsed(query(dnssec=True))[1])


def test_other_options_do_not_change_the_key() -> None:
    cookie = dns.edns.CookieOption(b"\x01" * 8, b"")
    assert cache_key(parsed(query(options=[cookie]))[1]) == cache_key(parsed(query())[1])


def test_unreadable_options_bypass_the_cache() -> None:
    wire = to_wire(query(edns=True))
    # The OPT record claims 4 bytes of options holding an option header that overruns them.
    broken = wire[:-2] + struct.pack("!H", 4) + struct.pack("!HH", 10, 20)
    assert cache_key(parse_query(broken)) is None
    assert cache_key(parse_query(broken), ecs_stripped=True) is None


# --- what is kept ----------------------------------------------------------------------------


def test_a_positive_answer_lives_for_its_smallest_ttl() -> None:
    message = query()
    q = parsed(message)[1]
    answer = answer_to(message, "A 192.0.2.1", authority=("example.com. 120 NS ns.example.com.",))
    entry = stored(answer, q, now=10.0)
    assert entry.ttl == 120
    assert entry.expires == 130.0


@pytest.mark.parametrize(
    ("soa_ttl", "minimum", "expected"), [(3600, 60, 60), (30, 600, 30), (45, 45, 45)]
)
def test_a_negative_answer_lives_for_min_of_soa_ttl_and_minimum(
    soa_ttl: int, minimum: int, expected: int
) -> None:
    # RFC 2308 §5.
    message = query()
    q = parsed(message)[1]
    for rcode in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR):  # NXDOMAIN and NODATA
        answer = answer_to(message, rcode=rcode, authority=(soa(soa_ttl, minimum),))
        entry = stored(answer, q)
        assert entry.ttl == expected


def test_a_negative_answer_without_soa_is_not_kept() -> None:
    message = query()
    q = parsed(message)[1]
    assert entry_for(answer_to(message, rcode=dns.rcode.NXDOMAIN), q) is None
    assert entry_for(answer_to(message), q) is None  # NODATA without SOA


@pytest.mark.parametrize(
    "rcode",
    [
        dns.rcode.SERVFAIL,
        dns.rcode.REFUSED,
        dns.rcode.FORMERR,
        dns.rcode.NOTIMP,
        dns.rcode.YXDOMAIN,
    ],
)
def test_error_answers_are_never_kept(rcode: int) -> None:
    message = query()
    q = parsed(message)[1]
    assert entry_for(answer_to(message, "A 192.0.2.1", rcode=rcode), q) is None


def test_a_truncated_answer_is_not_kept() -> None:
    message = query()
    q = parsed(message)[1]
    answer = bytearray(answer_to(message, "A 192.0.2.1"))
    answer[2] |= TC >> 8
    assert entry_for(bytes(answer), q) is None


@pytest.mark.parametrize("where", ["answer", "authority"])
def test_an_answer_with_a_ttl_of_zero_is_not_kept(where: str) -> None:
    message = query()
    q = parsed(message)[1]
    if where == "answer":
        answer = answer_to(message, "A 192.0.2.1", ttl=0)
    else:
        answer = answer_to(message, "A 192.0.2.1", authority=("example.com. 0 NS ns.example.com.",))
    assert entry_for(answer, q) is None


def test_a_negative_answer_whose_soa_minimum_is_zero_is_not_kept() -> None:
    message = query()
    q = parsed(message)[1]
    assert (
        entry_for(answer_to(message, rcode=dns.rcode.NXDOMAIN, authority=(soa(300, 0),)), q) is None
    )


def test_an_answer_with_client_subnet_is_not_kept() -> None:
    message = query(edns=True)
    q = parsed(message)[1]
    ecs = dns.edns.ECSOption("192.0.2.0", 24, 24)
    assert entry_for(answer_to(message, "A 192.0.2.1", options=[ecs]), q) is None


def test_a_signed_answer_is_not_kept() -> None:
    message = query()
    q = parsed(message)[1]
    response = dns.message.make_response(message)
    response.answer.append(
        dns.rrset.from_text(message.question[0].name, 60, "IN", "A", "192.0.2.1")
    )
    keyring = dns.tsigkeyring.from_text({"key.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    response.use_tsig(keyring, "key.")
    assert entry_for(to_wire(response), q) is None


def test_an_answer_with_an_extended_rcode_is_not_kept() -> None:
    message = query(edns=True)
    q = parsed(message)[1]
    answer = bytearray(answer_to(message, "A 192.0.2.1"))
    opt_ttl = len(answer) - 6  # the OPT record, last, has no options: TTL starts 6 from the end
    answer[opt_ttl] = 1  # BADVERS's upper bits
    assert entry_for(bytes(answer), q) is None


def test_garbage_after_the_last_record_is_not_kept_with_it() -> None:
    message = query()
    q = parsed(message)[1]
    answer = answer_to(message, "A 192.0.2.1", edns=False)
    entry = stored(answer + b"junk", q)
    assert entry.message == answer[:2] + entry.message[2:]  # same bytes but for the ID


# --- TTLs ------------------------------------------------------------------------------------


def test_ttls_are_clamped_by_min_and_max() -> None:
    message = query()
    q = parsed(message)[1]
    answer = answer_to(message, "A 192.0.2.1", authority=("example.com. 5 NS ns.example.com.",))
    entry = stored(answer, q, min_ttl=60, max_ttl=200)
    assert entry.ttl == 60
    served = entry.for_client(q, now=100.0)
    assert sorted(ttls(served)) == [60, 200]


def test_a_ttl_with_the_top_bit_set_is_large_not_zero() -> None:
    # RFC 8767 §4 reads it as positive (capped), where RFC 2181 §8 made it 0.
    message = query()
    q = parsed(message)[1]
    answer = bytearray(answer_to(message, "A 192.0.2.1", edns=False))
    struct.pack_into("!I", answer, len(answer) - 10, 0x80000001)  # the A record's TTL
    entry = stored(bytes(answer), q, max_ttl=86400)
    assert entry.ttl == 86400


@pytest.mark.parametrize(
    ("elapsed", "expected"), [(0.0, 300), (0.99, 300), (1.0, 299), (2.7, 298), (299.999, 1)]
)
def test_served_ttls_drop_by_whole_seconds(elapsed: float, expected: int) -> None:
    message = query()
    q = parsed(message)[1]
    entry = stored(answer_to(message, "A 192.0.2.1"), q, now=50.0)
    assert ttls(entry.for_client(q, now=50.0 + elapsed)) == [expected]


def test_served_ttls_never_go_below_zero() -> None:
    message = query()
    q = parsed(message)[1]
    answer = answer_to(message, "A 192.0.2.1", authority=("example.com. 900 NS ns.example.com.",))
    entry = stored(answer, q, now=0.0)
    assert sorted(ttls(entry.for_client(q, now=400.0))) == [0, 500]


def test_a_stale_answer_carries_ttl_30_and_says_it_is_stale() -> None:
    message = query(edns=True)
    q = parsed(message)[1]
    entry = stored(answer_to(message, "A 192.0.2.1"), q, now=0.0, serve_stale=3600)
    served = dns.message.from_wire(entry.for_client(q, now=1000.0, stale=True))
    assert [rrset.ttl for rrset in served.answer] == [STALE_TTL]
    # RFC 8914: Extended DNS Error 3, Stale Answer.
    assert [(o.otype, o.to_wire()) for o in served.options] == [(15, b"\x00\x03")]


@SOME
@given(
    ttl_values=st.lists(st.integers(1, 0xFFFFFFFF), min_size=1, max_size=5),
    elapsed=st.floats(0, 200_000, allow_nan=False),
    min_ttl=st.integers(0, 3600),
    max_ttl=st.integers(3600, 172800),
)
def test_a_served_ttl_never_exceeds_the_stored_one_nor_goes_below_zero(
    ttl_values: list[int], elapsed: float, min_ttl: int, max_ttl: int
) -> None:
    message = query()
    q = parsed(message)[1]
    response = dns.message.make_response(message)
    for index, value in enumerate(ttl_values):
        response.answer.append(
            dns.rrset.from_text(f"n{index}.example.com.", value, "IN", "A", "192.0.2.1")
        )
    entry = stored(to_wire(response), q, now=0.0, min_ttl=min_ttl, max_ttl=max_ttl)
    for served, value in zip(ttls(entry.for_client(q, now=elapsed)), ttl_values, strict=True):
        kept = min(max(value, min_ttl), max_ttl, 604_800)
        assert 0 <= served <= kept
        assert served == max(0, kept - int(elapsed))


# --- what the client sees --------------------------------------------------------------------


def test_the_client_gets_its_id_its_question_bytes_and_its_rd_bit() -> None:
    first = query("www.example.com.", msg_id=1)
    entry = stored(answer_to(first, "A 192.0.2.1"), parsed(first)[1])
    second = query("WwW.eXaMpLe.CoM.", msg_id=0xBEEF, flags=0)
    q = parsed(second)[1]
    served = entry.for_client(q, now=100.0)
    assert served[:2] == b"\xbe\xef"
    assert served[HEADER_SIZE : HEADER_SIZE + len(q.question)] == q.question
    reply = dns.message.from_wire(served)
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.RA
    assert not reply.flags & dns.flags.RD
    assert not reply.flags & dns.flags.AA
    assert reply.question[0].name.to_text() == "WwW.eXaMpLe.CoM."
    assert reply.answer[0][0].to_text() == "192.0.2.1"


@pytest.mark.parametrize("client_edns", [False, True])
@pytest.mark.parametrize("upstream_edns", [False, True])
def test_an_opt_record_only_for_a_client_that_sent_one(
    client_edns: bool, upstream_edns: bool
) -> None:
    first = query(edns=upstream_edns)
    entry = stored(answer_to(first, "A 192.0.2.1", edns=upstream_edns), parsed(first)[1])
    q = parsed(query(edns=client_edns))[1]
    reply = dns.message.from_wire(entry.for_client(q, now=100.0))
    assert (reply.edns >= 0) is client_edns
    assert not reply.options  # the upstream's options are not passed on from the cache


def test_the_do_bit_is_echoed() -> None:
    first = query(dnssec=True)
    entry = stored(answer_to(first, "A 192.0.2.1"), parsed(first)[1])
    reply = dns.message.from_wire(entry.for_client(parsed(query(dnssec=True))[1], now=100.0))
    assert reply.ednsflags & dns.flags.DO


@pytest.mark.parametrize(
    ("client", "expected"),
    [({"flags": RD}, False), ({"flags": RD | AD}, True), ({"dnssec": True}, True)],
)
def test_ad_only_for_a_client_that_asked_for_it(client: dict[str, object], expected: bool) -> None:
    # RFC 6840 §5.8.
    first = query(dnssec=True)
    response = bytearray(answer_to(first, "A 192.0.2.1"))
    response[3] |= AD
    entry = stored(bytes(response), parsed(first)[1])
    reply = dns.message.from_wire(entry.for_client(parsed(query(**client))[1], now=100.0))  # type: ignore[arg-type]
    assert bool(reply.flags & dns.flags.AD) is expected


def test_the_upstreams_opt_is_taken_out_wherever_it_sits() -> None:
    message = query(edns=True)
    q = parsed(message)[1]
    response = dns.message.make_response(message)
    response.use_edns(False)
    name = message.question[0].name
    response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
    response.additional.append(dns.rrset.from_text("ns.example.com.", 60, "IN", "A", "192.0.2.53"))
    wire = to_wire(response)
    # The OPT record (with a padding option) before the other additional record, not last.
    additional_at = record_at(wire, HEADER_SIZE + len(q.question))[1]
    opt = b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 44) + struct.pack("!HH", 12, 40) + bytes(40)
    moved = wire[:10] + b"\x00\x02" + wire[12:additional_at] + opt + wire[additional_at:]
    assert dns.message.from_wire(moved).edns == 0  # well formed
    entry = stored(moved, q)
    reply = dns.message.from_wire(entry.for_client(parsed(query())[1], now=101.5))
    assert reply.edns < 0
    assert [rrset.ttl for rrset in reply.additional] == [59]
    assert reply.additional[0][0].to_text() == "192.0.2.53"


@SOME
@given(message=queries(), client_id=st.integers(0, 0xFFFF), elapsed=st.floats(0, 100))
def test_a_served_answer_always_parses_and_is_the_clients(
    message: dns.message.QueryMessage, client_id: int, elapsed: float
) -> None:
    wire = to_wire(message)
    q = parse_query(wire)
    key = cache_key(q)
    assume(key is not None)
    response = dns.message.make_response(message)
    response.answer.append(
        dns.rrset.from_text(message.question[0].name, 60, "IN", "A", "192.0.2.1")
    )
    entry = entry_for(to_wire(response), q, now=0.0)
    assert entry is not None
    client = q._replace(id=client_id)
    served = entry.for_client(client, now=elapsed)
    reply = dns.message.from_wire(served)  # parses
    assert reply.id == client_id
    assert served[HEADER_SIZE : HEADER_SIZE + len(q.question)] == q.question
    assert (reply.edns >= 0) is (q.opt is not None)


@SOME
@given(name=dns_names())
def test_keys_of_names_differing_only_in_case_are_equal(name: dns.name.Name) -> None:
    lower = dns.name.Name([label.lower() for label in name.labels])
    assert cache_key(parsed(query(name.to_text()))[1]) == cache_key(
        parsed(query(lower.to_text()))[1]
    )


# --- the store -------------------------------------------------------------------------------


def put(
    cache: AnswerCache,
    name: str,
    now: float = 0.0,
    ttl: int = 300,
    *,
    record: str = "A 192.0.2.1",
    dnssec: bool = False,
) -> bytes:
    message = query(name, record.split(maxsplit=1)[0], dnssec=dnssec)
    q = parsed(message)[1]
    key = cache_key(q)
    assert key is not None
    assert cache.put(key, answer_to(message, record, ttl=ttl), HEADER_SIZE + len(q.question), now)
    return key


def test_the_least_recently_used_answer_goes_first() -> None:
    cache = AnswerCache(size=2)
    a = put(cache, "a.example.")
    b = put(cache, "b.example.")
    assert cache.get(a, 1.0) is not None  # a is now the most recently used
    c = put(cache, "c.example.")
    assert len(cache) == 2
    assert cache.get(b, 1.0) is None
    assert cache.get(a, 1.0) is not None
    assert cache.get(c, 1.0) is not None
    assert cache.evictions == 1


def test_an_expired_answer_is_gone_without_serve_stale() -> None:
    cache = AnswerCache(size=10)
    key = put(cache, "a.example.", now=0.0, ttl=10)
    assert cache.get(key, 9.999) is not None
    assert cache.get(key, 10.0) is None
    assert len(cache) == 0


def test_an_expired_answer_stays_for_the_serve_stale_window() -> None:
    cache = AnswerCache(size=10, serve_stale=100)
    key = put(cache, "a.example.", now=0.0, ttl=10)
    entry = cache.get(key, 50.0)
    assert entry is not None
    assert entry.expires == 10.0
    assert cache.get(key, 109.9) is not None
    assert cache.get(key, 110.0) is None


def test_an_answer_that_may_not_be_kept_leaves_the_old_one() -> None:
    cache = AnswerCache(size=10, serve_stale=100)
    key = put(cache, "a.example.", ttl=10)
    message = query("a.example.")
    q = parsed(message)[1]
    servfail = answer_to(message, rcode=dns.rcode.SERVFAIL)
    assert cache.put(key, servfail, HEADER_SIZE + len(q.question), 20.0) is None
    assert cache.get(key, 20.0) is not None


def test_resize_drops_the_oldest() -> None:
    cache = AnswerCache(size=5)
    keys = [put(cache, f"n{i}.example.") for i in range(5)]
    cache.resize(2, min_ttl=0, max_ttl=86400, serve_stale=0)
    assert [cache.get(key, 1.0) is not None for key in keys] == [False, False, False, True, True]


def test_the_size_bound_holds_under_many_names() -> None:
    cache = AnswerCache(size=50)
    for index in range(500):
        put(cache, f"n{index}.example.")
    assert len(cache) == 50
    assert cache.evictions == 450


def test_drop_names_drops_every_answer_for_those_names_and_only_those() -> None:
    cache = AnswerCache(size=50)
    kept = put(cache, "printer.example.")
    doomed = [
        put(cache, "nas.example."),
        put(cache, "NAS.example.", record="AAAA 2001:db8::1"),
        put(cache, "nas.example.", dnssec=True),
    ]
    entries = [cache.get(key, 1.0) for key in doomed]
    assert cache.drop_names({dns.name.from_text("nas.example.").to_wire()}) == 3
    assert cache.get(kept, 1.0) is not None
    assert all(cache.get(key, 1.0) is None for key in doomed)
    assert all(entry is not None and entry.gone for entry in entries)
