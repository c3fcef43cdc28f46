"""The hosts-file parser (core/hosts.py): text in, records by name out, problems by line."""

from __future__ import annotations

import ipaddress

import dns.name
import dns.reversename
from hypothesis import given
from hypothesis import strategies as st

from dot_proxy.core.hosts import TYPE_A, TYPE_AAAA, TYPE_PTR, parse_hosts
from dot_proxy.core.zones import name_to_wire

DEBIAN_HOSTS = """\
127.0.0.1	localhost
127.0.1.1	laptop.lan	laptop

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
192.168.1.10 printer.lan Printer   # the office printer
192.168.1.11 nas.lan nas
fd00::10 printer.lan
"""


def records(text: str, name: str) -> dict[int, tuple[bytes, ...]]:
    table, _ = parse_hosts(text)
    return dict(table.names.get(name_to_wire(name), ()))


def reverse(address: str) -> bytes:
    wire: bytes = dns.reversename.from_address(address).to_wire()
    return wire


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def test_a_debian_hosts_file() -> None:
    table, problems = parse_hosts(DEBIAN_HOSTS)
    assert problems == []
    assert records(DEBIAN_HOSTS, "printer.lan") == {
        TYPE_A: (packed("192.168.1.10"),),
        TYPE_AAAA: (packed("fd00::10"),),
    }
    assert records(DEBIAN_HOSTS, "laptop") == {TYPE_A: (packed("127.0.1.1"),)}
    assert records(DEBIAN_HOSTS, "ip6-loopback") == {TYPE_AAAA: (packed("::1"),)}
    # Several names a line, letter case folded, a comment after the names.
    assert records(DEBIAN_HOSTS, "PRINTER") == {TYPE_A: (packed("192.168.1.10"),)}
    # The PTR names the first name on the address's line.
    assert table.names[reverse("192.168.1.10")] == ((TYPE_PTR, (name_to_wire("printer.lan"),)),)
    assert table.names[reverse("::1")] == ((TYPE_PTR, (name_to_wire("localhost"),)),)
    assert table.names[reverse("fd00::10")] == ((TYPE_PTR, (name_to_wire("printer.lan"),)),)
    assert name_to_wire("nobody.lan") not in table.names


def test_the_first_line_that_lists_an_address_names_it() -> None:
    text = "10.0.0.1 first.lan alias\n10.0.0.1 second.lan\n"
    table, _ = parse_hosts(text)
    assert table.names[reverse("10.0.0.1")] == ((TYPE_PTR, (name_to_wire("first.lan"),)),)
    assert records(text, "second.lan") == {TYPE_A: (packed("10.0.0.1"),)}


def test_a_name_on_several_lines_gets_every_address_once_in_file_order() -> None:
    text = "10.0.0.2 web\n10.0.0.1 web\n10.0.0.2 web\n2001:db8::1 web\n"
    assert records(text, "web") == {
        TYPE_A: (packed("10.0.0.2"), packed("10.0.0.1")),
        TYPE_AAAA: (packed("2001:db8::1"),),
    }


def test_bad_lines_are_reported_with_their_number_and_the_rest_is_kept() -> None:
    text = (
        "10.0.0.1 good.lan\n"  # 1
        "not-an-address name\n"  # 2
        "10.0.0.300 overflow\n"  # 3
        "10.0.0.2\n"  # 4: no name
        "fe80::1%lo0 localhost\n"  # 5: scoped (macOS)
        "10.0.0.3 ok.lan bad..name also-ok\n"  # 6: one bad name
        "   # only a comment\n"  # 7
        "\n"  # 8
        "10.0.0.4 ünïcode\n"  # 9
        "010.0.0.5 octal\n"  # 10: leading zeros are ambiguous
    )
    table, problems = parse_hosts(text)
    assert [problem.line for problem in problems] == [2, 3, 4, 5, 6, 9, 10]
    assert "not an IPv4 or IPv6 address" in problems[0].reason
    assert "no host name" in problems[2].reason
    assert "scoped" in problems[3].reason
    assert "'bad..name'" in problems[4].reason
    assert str(problems[0]) == "line 2: not an IPv4 or IPv6 address: 'not-an-address name'"
    assert set(table.names) == {
        name_to_wire(name) for name in ("good.lan", "ok.lan", "also-ok")
    } | {reverse("10.0.0.1"), reverse("10.0.0.3")}


def test_a_line_of_only_bad_names_reports_each() -> None:
    table, problems = parse_hosts("10.0.0.1 a..b c..d\n")
    assert [problem.line for problem in problems] == [1, 1]
    assert len(table) == 0


def test_blocklists_share_their_record_sets() -> None:
    text = "".join(f"0.0.0.0 ad{index}.example\n" for index in range(1000))
    table, problems = parse_hosts(text)
    assert not problems
    first = table.names[name_to_wire("ad0.example")]
    assert all(table.names[name_to_wire(f"ad{i}.example")] is first for i in range(1000))
    assert table.names[reverse("0.0.0.0")] == ((TYPE_PTR, (name_to_wire("ad0.example"),)),)


def test_a_reverse_name_listed_as_a_host_answers_both() -> None:
    text = "127.0.0.1 localhost\n10.9.9.9 1.0.0.127.in-addr.arpa\n"
    assert records(text, "1.0.0.127.in-addr.arpa") == {
        TYPE_A: (packed("10.9.9.9"),),
        TYPE_PTR: (name_to_wire("localhost"),),
    }


def test_windows_line_ends_and_tabs() -> None:
    assert records("10.0.0.1\tpc\t\tpc.lan\r\n", "pc.lan") == {TYPE_A: (packed("10.0.0.1"),)}


# dnspython maps an IPv4-mapped IPv6 address to in-addr.arpa; the parser gives every IPv6
# address its ip6.arpa name, so the oracle is not asked about those.
ADDRESS = st.one_of(
    st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
)
HOST = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)


@given(st.lists(st.tuples(ADDRESS, st.lists(HOST, min_size=1, max_size=3)), max_size=12))
def test_generated_files_parse_to_what_they_say(
    lines: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, list[str]]],
) -> None:
    text = "\n".join(f"{address} {' '.join(names)}  # comment" for address, names in lines)
    table, problems = parse_hosts(text)
    assert problems == []
    for address, names in lines:
        rtype = TYPE_A if address.version == 4 else TYPE_AAAA
        for name in names:
            assert address.packed in dict(table.names[name_to_wire(name)])[rtype]
        first_line = next(n for a, n in lines if a == address)
        ptr = dict(table.names[reverse(str(address))])[TYPE_PTR]
        assert ptr == (dns.name.from_text(first_line[0]).canonicalize().to_wire(),)
