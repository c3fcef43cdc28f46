"""The /etc/hosts format, sans-I/O: text in, the records it defines out.

Each line is an address and one or more names, ``#`` starts a comment (hosts(5)). A name gets
an A record for each IPv4 line it is on and an AAAA record for each IPv6 line, in file order;
an address gets one PTR record, naming the first name of the first line that lists it, as
glibc's ``gethostbyaddr`` does with this file. A line that cannot be used is reported with its
number and skipped, and a bad name costs only itself: a hosts file is often written by other
tools (ad blockers, container runtimes), and one odd line must not lose the rest.

Nothing here reads a file: the caller reads it (and re-reads it on change) and hands the text
over, so this is tested without a file system.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from dot_proxy.core.message import TYPE_A, TYPE_AAAA, TYPE_PTR
from dot_proxy.core.zones import name_to_wire

__all__ = [
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_PTR",
    "HostsProblem",
    "HostsTable",
    "RRsets",
    "parse_hosts",
]

#: A name's records: (type, rdatas) pairs, each type once, rdatas in wire format.
RRsets = tuple[tuple[int, tuple[bytes, ...]], ...]


@dataclass(frozen=True, slots=True)
class HostsProblem:
    """A line, or a name on it, that was skipped, and why."""

    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}: {self.text.strip()!r}"


@dataclass(frozen=True, slots=True)
class HostsTable:
    """What a hosts file defines: every name it lists, forward and reverse, with its records.

    ``names`` maps lower-cased wire names (host names, and the ``in-addr.arpa`` /
    ``ip6.arpa`` names of the addresses) to their records. Identical record sets are one
    object, so a blocklist of 100,000 names pointing at 0.0.0.0 costs one tuple, not 100,000.
    """

    names: Mapping[bytes, RRsets]

    def __len__(self) -> int:
        return len(self.names)


def parse_hosts(text: str) -> tuple[HostsTable, list[HostsProblem]]:
    """Parse hosts-file text; return the table and the problems found, by line number.

    Error handling: never raises for bad content; every skipped line or name is a
    :class:`HostsProblem` (an address that does not parse, a scoped IPv6 address such as
    ``fe80::1%lo0`` whose zone DNS cannot carry, a line with no name, a name that is not a
    host name).
    """
    ipv4: dict[bytes, list[bytes]] = {}
    ipv6: dict[bytes, list[bytes]] = {}
    ptr: dict[bytes, bytes] = {}
    problems: list[HostsProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.partition("#")[0].split()
        if not fields:
            continue
        address = _address(fields[0])
        if isinstance(address, str):
            problems.append(HostsProblem(number, address, line))
            continue
        names = _names(fields[1:], number, line, problems)
        if not names:
            if len(fields) == 1:
                problems.append(HostsProblem(number, "no host name after the address", line))
            continue
        by_name = ipv4 if address.version == 4 else ipv6
        for name in names:
            listed = by_name.setdefault(name, [])
            if address.packed not in listed:
                listed.append(address.packed)
        # The first line that lists an address names it (glibc's gethostbyaddr does too).
        ptr.setdefault(name_to_wire(address.reverse_pointer), names[0])
    return HostsTable(_records(ipv4, ipv6, ptr)), problems


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """The address, or why it cannot be used."""
    if "%" in text:
        return "a scoped IPv6 address (%zone) cannot be given out in DNS"
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return "not an IPv4 or IPv6 address"


def _names(fields: list[str], number: int, line: str, problems: list[HostsProblem]) -> list[bytes]:
    names: list[bytes] = []
    for field in fields:
        try:
            wire = name_to_wire(field)
        except ValueError as exc:
            problems.append(HostsProblem(number, f"{field!r} is not a host name ({exc})", line))
            continue
        if wire == b"\x00":
            problems.append(HostsProblem(number, f"{field!r} is not a host name", line))
            continue
        if wire not in names:
            names.append(wire)
    return names


def _records(
    ipv4: dict[bytes, list[bytes]], ipv6: dict[bytes, list[bytes]], ptr: dict[bytes, bytes]
) -> dict[bytes, RRsets]:
    shared: dict[RRsets, RRsets] = {}
    records: dict[bytes, RRsets] = {}
    for name in {**ipv4, **ipv6}:
        rrsets: RRsets = tuple(
            (rtype, tuple(by_name[name]))
            for rtype, by_name in ((TYPE_A, ipv4), (TYPE_AAAA, ipv6))
            if name in by_name
        )
        records[name] = shared.setdefault(rrsets, rrsets)
    for reverse, target in ptr.items():
        # A reverse name can also be listed as a host name ("1.0.0.127.in-addr.arpa" on a
        # line of its own): it then answers both.
        rrsets = (*records.get(reverse, ()), (TYPE_PTR, (target,)))
        records[reverse] = shared.setdefault(rrsets, rrsets)
    return records
