"""The zone table (core/zones.py): names in wire form, longest match on label boundaries."""

from __future__ import annotations

import dns.name
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dot_proxy.core.zones import ROOT, ZoneTable, ancestors, name_from_wire, name_to_wire

LABEL = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=12,
)
NAME = st.lists(LABEL, min_size=0, max_size=6).map(".".join)


def wire(text: str) -> bytes:
    """dnspython's wire form, lower-cased: the oracle for name_to_wire."""
    name: bytes = dns.name.from_text(text).canonicalize().to_wire()
    return name


@given(NAME, st.booleans())
def test_name_to_wire_matches_dnspython(text: str, dot: bool) -> None:
    written = text + "." if dot or not text else text
    assert name_to_wire(written) == wire(text + "." if text else ".")


@given(NAME)
def test_name_from_wire_round_trips(text: str) -> None:
    encoded = name_to_wire(text)
    assert name_from_wire(encoded) == dns.name.from_wire(encoded, 0)[0].to_text()
    assert name_to_wire(name_from_wire(encoded)) == encoded


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a..b", "empty label"),
        ("a" * 64 + ".com", "longer than 63"),
        ("exa mple.com", "character"),
        ("exämple.com", "character"),
        ("a\\.b", "character"),
        (".".join(["abcdefghi"] * 26), "255 bytes"),
    ],
)
def test_bad_names_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        name_to_wire(text)


def test_root_and_trailing_dots() -> None:
    assert name_to_wire(".") == ROOT
    assert name_to_wire("") == ROOT
    assert name_to_wire("Example.COM.") == name_to_wire("example.com") == b"\x07example\x03com\x00"
    assert name_from_wire(ROOT) == "."


def test_name_from_wire_escapes_like_rfc1035() -> None:
    assert name_from_wire(b"\x03a.b\x01\x07\x00") == "a\\.b.\\007."


def test_ancestors_nearest_first() -> None:
    assert list(ancestors(name_to_wire("a.b.c"))) == [
        name_to_wire("b.c"),
        name_to_wire("c"),
        ROOT,
    ]
    assert list(ancestors(ROOT)) == []


# --- longest match ------------------------------------------------------------------------------


def key(text: str) -> bytes:
    return name_to_wire(text)


def table(*zones: str) -> ZoneTable[str]:
    return ZoneTable({name_to_wire(zone): zone for zone in zones})


def test_longest_match_wins() -> None:
    zones = table("example.com", "corp.example.com", "com")
    assert zones.longest_match(key("www.corp.example.com")) == "corp.example.com"
    assert zones.longest_match(key("corp.example.com")) == "corp.example.com"
    assert zones.longest_match(key("www.example.com")) == "example.com"
    assert zones.longest_match(key("example.com")) == "example.com"
    assert zones.longest_match(key("other.com")) == "com"
    assert zones.longest_match(key("example.org")) is None
    assert zones.longest_match(ROOT) is None


def test_matching_is_on_label_boundaries() -> None:
    zones = table("example.com")
    assert zones.longest_match(key("xexample.com")) is None
    assert zones.longest_match(key("x.example.com")) == "example.com"
    assert zones.longest_match(key("example.com.evil")) is None
    assert zones.longest_match(key("com")) is None


def test_matching_ignores_case_of_the_configured_zone() -> None:
    zones = ZoneTable({name_to_wire("Home.ARPA."): "home"})
    assert zones.longest_match(name_to_wire("printer.HOME.arpa")) == "home"


def test_a_label_holding_a_dot_does_not_split() -> None:
    # In wire format "a.example" can be one label; it is not the name a.example.com's ancestor.
    zones = table("example.com")
    one_label = b"\x09a.example\x03com\x00"
    assert zones.longest_match(one_label) is None
    assert zones.longest_match(b"\x01a" + key("example.com")) == "example.com"


def test_a_byte_match_off_the_label_boundaries_is_no_match() -> None:
    # The last label is "xx\x04arpa": its bytes end like the label "arpa", but it is not it.
    zones = table("arpa")
    assert zones.longest_match(b"\x07xx\x04arpa\x00") is None
    assert zones.longest_match(b"\x02xx\x04arpa\x00") == "arpa"


def test_root_zone_matches_everything_else() -> None:
    zones = ZoneTable({ROOT: "root", name_to_wire("lan"): "lan"})
    assert zones.longest_match(key("printer.lan")) == "lan"
    assert zones.longest_match(key("example.com")) == "root"
    assert zones.longest_match(ROOT) == "root"


def test_empty_table_and_broken_names_match_nothing() -> None:
    assert ZoneTable[str]({}).longest_match(key("a.b")) is None
    zones = table("com")
    assert zones.longest_match(b"\x07example\x03com") is None  # no root label
    assert zones.longest_match(b"\x07example\x03com\x00junk") is None
    assert zones.longest_match(b"\x3fabc") is None  # runs past the end
    assert zones.longest_match(b"") is None


@given(st.lists(NAME, max_size=8), NAME)
def test_longest_match_agrees_with_dnspython(zone_texts: list[str], query: str) -> None:
    zones = {name_to_wire(text): text for text in zone_texts}
    found = ZoneTable(zones).longest_match(name_to_wire(query))
    qname = dns.name.from_text(query)
    enclosing = [text for text in zones.values() if qname.is_subdomain(dns.name.from_text(text))]
    if not enclosing:
        assert found is None
    else:
        deepest = max(enclosing, key=lambda text: len(dns.name.from_text(text)))
        assert found is not None
        assert name_to_wire(found) == name_to_wire(deepest)
