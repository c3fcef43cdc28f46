"""EDNS Client Subnet removal (core/ecs.py), checked with dnspython."""

from __future__ import annotations

import dns.edns
import dns.message
import dns.rrset
import dns.tsig
import dns.tsigkeyring
from hypothesis import given
from hypothesis import strategies as st

from dot_proxy.core.ecs import OPTION_ECS, strip_ecs

COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)
NSID = dns.edns.GenericOption(dns.edns.OptionType.NSID, b"")


def query(*options: dns.edns.Option, dnssec: bool = False) -> dns.message.Message:
    return dns.message.make_query(
        "www.example.com", "A", use_edns=0, options=list(options), want_dnssec=dnssec, payload=4096
    )


def codes(message: dns.message.Message) -> list[int]:
    return [int(option.otype) for option in message.options]


def test_the_client_subnet_is_removed_and_the_rest_kept_in_order() -> None:
    original = query(COOKIE, dns.edns.ECSOption("192.0.2.77", 24), NSID, dnssec=True)
    stripped = dns.message.from_wire(strip_ecs(original.to_wire()))
    assert codes(stripped) == [dns.edns.OptionType.COOKIE, dns.edns.OptionType.NSID]
    assert stripped.options[0] == COOKIE
    assert stripped.payload == 4096
    assert stripped.ednsflags == original.ednsflags
    assert stripped.question == original.question
    assert stripped.id == original.id


def test_an_opt_with_only_ecs_stays_empty() -> None:
    stripped = dns.message.from_wire(
        strip_ecs(query(dns.edns.ECSOption("2001:db8::", 56)).to_wire())
    )
    assert stripped.edns == 0
    assert stripped.options == ()


def test_every_ecs_option_goes() -> None:
    two = query(dns.edns.ECSOption("192.0.2.0", 24), COOKIE, dns.edns.ECSOption("10.0.0.0", 8))
    assert codes(dns.message.from_wire(strip_ecs(two.to_wire()))) == [dns.edns.OptionType.COOKIE]


def test_nothing_to_do_returns_the_same_object() -> None:
    for message in [
        query(COOKIE).to_wire(),
        dns.message.make_query("example.com", "A", use_edns=False).to_wire(),
        b"\x00\x08",  # the code's bytes, but no message
        b"",
    ]:
        assert strip_ecs(message) is message


def test_an_answer_loses_its_ecs_option() -> None:
    original = query(dns.edns.ECSOption("192.0.2.0", 24))
    response = dns.message.make_response(original)
    response.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "A", "192.0.2.1"))
    response.use_edns(0, options=[dns.edns.ECSOption("192.0.2.0", 24, 24), NSID])
    stripped = dns.message.from_wire(strip_ecs(response.to_wire()))
    assert codes(stripped) == [dns.edns.OptionType.NSID]
    assert stripped.answer == response.answer


def test_signed_queries_are_left_as_they_are() -> None:
    signed = query(dns.edns.ECSOption("192.0.2.0", 24))
    keyring = dns.tsigkeyring.from_text({"key.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    signed.use_tsig(keyring, keyname="key.")
    wire = signed.to_wire()
    assert strip_ecs(wire) is wire


def test_broken_messages_are_passed_on_unchanged() -> None:
    wire = query(dns.edns.ECSOption("192.0.2.0", 24)).to_wire()
    for broken in [wire[:-3], wire[:20], wire[:-12] + b"\x00\x08\xff\xff" + wire[-8:]]:
        assert strip_ecs(broken) is broken
    # An option whose length overruns its OPT record.
    overrun = wire.replace(b"\x00\x08\x00\x07", b"\x00\x08\x00\xff")
    assert overrun != wire
    assert strip_ecs(overrun) is overrun


ADDRESSES = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
)
OTHER = st.sampled_from([COOKIE, NSID, dns.edns.GenericOption(65001, b"xyz")])


@given(st.lists(st.one_of(ADDRESSES, OTHER), max_size=5), st.booleans())
def test_stripped_messages_parse_and_hold_everything_but_ecs(
    items: list[object], dnssec: bool
) -> None:
    options: list[dns.edns.Option] = []
    for item in items:
        if isinstance(item, tuple):
            address, prefix = item
            options.append(dns.edns.ECSOption(str(address), prefix))
        else:
            assert isinstance(item, dns.edns.Option)
            options.append(item)
    wire = query(*options, dnssec=dnssec).to_wire()
    stripped = dns.message.from_wire(strip_ecs(wire))
    assert [o for o in stripped.options] == [o for o in options if o.otype != OPTION_ECS]
    assert len(strip_ecs(wire)) == len(wire) - sum(
        4 + len(o.to_wire() or b"") for o in options if o.otype == OPTION_ECS
    )
    assert bool(stripped.ednsflags) == dnssec
