"""Where a query goes: answered here, or forwarded to which upstreams. Sans-I/O.

Three sources decide, most specific first:

1. The hosts file (:mod:`dot_proxy.core.hosts`): a name it lists (or the reverse name of an
   address it lists) is answered from it, whatever zone it is in.
2. The ``--forward`` zones and the built-in local zones, in one table: the deepest zone that
   encloses the name wins, and a forward zone wins over a built-in zone of the same name. So
   ``--forward 168.192.in-addr.arpa=plain:192.168.1.1`` sends those reverse queries to the
   router, while ``--forward arpa=...`` leaves the built-in ``10.in-addr.arpa`` local.
3. Anything else goes to the default upstreams.

The built-in zones are those RFC 6761 §6, RFC 6303 §4 (with RFC 7793's 100.64/10), RFC 8375,
RFC 6762 and RFC 7686 say a resolver should answer itself: ``localhost.`` and every name below
it answer 127.0.0.1 and ::1 (RFC 6761 §6.3), the reverse zones of private and special addresses
and ``home.arpa.``, ``local.``, ``invalid.`` and ``onion.`` answer NXDOMAIN, never asked of
an upstream: their names mean nothing outside this network, and asking a public resolver about
them leaks the network's shape. ``test.`` and ``example.`` are ordinary names here (RFC 6761
§6.2, §6.5). Like unbound's default local zones, each zone's apex holds an SOA and an NS record,
127.0.0.1 and ::1 have a PTR record naming ``localhost.``, and every negative answer carries
the zone's SOA (RFC 2308 §3) with unbound's values: ``localhost. nobody.invalid. 1 3600 1200
604800 10800``, TTL 10800 (three hours: these answers never change).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Final, Generic, NamedTuple, TypeVar

from dot_proxy.core.hosts import HostsTable, RRsets
from dot_proxy.core.message import (
    CLASS_ANY,
    CLASS_IN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_NS,
    TYPE_PTR,
    TYPE_SOA,
    Rcode,
)
from dot_proxy.core.zones import ROOT, ZoneTable, ancestors, name_to_wire, top_level

__all__ = [
    "BUILTIN_NETWORKS",
    "BUILTIN_NXDOMAIN_ZONES",
    "HOSTS_TTL",
    "LOCAL_TTL",
    "Forward",
    "Local",
    "Router",
    "Soa",
    "builtin_zone_names",
    "reverse_zones",
]

T = TypeVar("T")

#: Top-level domains the router turns names away by at most (see Router.route); with more (a
#: blocklist for a hosts file), each name goes through the hosts and zone tables instead.
MAX_REJECT_SUFFIXES: Final = 64
#: TTL of the built-in zones' records and negative answers (unbound's default local zones).
LOCAL_TTL: Final = 10800
#: TTL of hosts-file answers, positive and negative. A hosts file is edited by hand and re-read
#: on change: a minute bounds how long a stub keeps an answer the edit replaced, and still lets
#: stub caches absorb bursts (CoreDNS's hosts plugin uses 3600, dnsmasq 0).
HOSTS_TTL: Final = 60

#: Networks whose reverse zones are answered here (RFC 6303 §4.1-4.10, RFC 7793, RFC 9637).
BUILTIN_NETWORKS: Final = (
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",  # RFC 1918
    "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 shared address space (RFC 7793)
    "0.0.0.0/8",  # "this network" (RFC 6303 §4.2)
    "127.0.0.0/8",  # loopback (RFC 6303 §4.2)
    "169.254.0.0/16",  # link-local (RFC 6303 §4.3)
    "192.0.2.0/24",  # TEST-NET-1 (RFC 5737)
    "198.51.100.0/24",  # TEST-NET-2
    "203.0.113.0/24",  # TEST-NET-3
    "255.255.255.255/32",  # broadcast (RFC 6303 §4.5)
    "::/128",  # unspecified (RFC 6303 §4.6)
    "::1/128",  # loopback (RFC 6303 §4.7)
    "fc00::/7",  # unique local (RFC 4193; RFC 6303 §4.8 lists fd00::/8)
    "fe80::/10",  # link-local (RFC 6303 §4.9)
    "2001:db8::/32",  # documentation (RFC 3849, RFC 6303 §4.10)
    "3fff::/20",  # documentation (RFC 9637)
)
#: Special-use names answered NXDOMAIN here (RFC 8375, RFC 6762 §3, RFC 6761 §6.4, RFC 7686).
BUILTIN_NXDOMAIN_ZONES: Final = ("home.arpa.", "local.", "invalid.", "onion.")
LOCALHOST: Final = name_to_wire("localhost.")
_LOOPBACK_V4: Final = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6: Final = ipaddress.IPv6Address("::1")


class Soa(NamedTuple):
    """The SOA record a negative answer carries in its authority section (RFC 2308 §3).

    ``apex`` is the zone's wire name, or ``None`` for "the query name itself" (a hosts name
    outside any local zone: each is answered as the apex of its own zone). ``ttl`` is the
    record's TTL in a negative answer: min(SOA TTL, MINIMUM), RFC 2308 §3 and §5.
    """

    apex: bytes | None
    rdata: bytes
    ttl: int


class Local(NamedTuple):
    """A query answered here: ``rcode``, the records its name holds, and the SOA for NODATA.

    For NOERROR the builder answers with the records of the query's type (all for ANY) or,
    when there are none, NODATA with ``soa`` in the authority section; NXDOMAIN carries
    ``soa`` too; REFUSED (a class other than IN in a local zone) carries nothing.
    """

    rcode: int
    rrsets: RRsets
    ttl: int
    soa: Soa | None


class Forward(NamedTuple, Generic[T]):
    """A query for the upstreams ``target``; ``zone`` is the forward zone that matched
    (the root for the default upstreams)."""

    target: T
    zone: bytes


class _LocalZone(NamedTuple):
    """A built-in zone: the answers of its names, made once."""

    names: Mapping[bytes, Local]  # its records, and its empty non-terminals
    other: Local  # any other name in it: NXDOMAIN, or localhost's A and AAAA
    refused: Local


def soa_rdata(*, minimum: int) -> bytes:
    """unbound's SOA for local zones: ``localhost. nobody.invalid. 1 3600 1200 604800 MIN``."""
    fields = (1, 3600, 1200, 604800, minimum)
    return (
        LOCALHOST
        + name_to_wire("nobody.invalid.")
        + b"".join(value.to_bytes(4, "big") for value in fields)
    )


_LOCAL_SOA_RDATA: Final = soa_rdata(minimum=LOCAL_TTL)
_HOSTS_SOA_RDATA: Final = soa_rdata(minimum=HOSTS_TTL)


def reverse_zones(network: str) -> list[str]:
    """The reverse zones (``in-addr.arpa``/``ip6.arpa``) that together cover ``network``.

    Reverse names split on octets (IPv4) and nibbles (IPv6), so a prefix that is not a
    multiple of 8 or 4 becomes several zones: 172.16.0.0/12 is 16.172 to 31.172.in-addr.arpa.
    """
    net = ipaddress.ip_network(network)
    step = 8 if net.version == 4 else 4
    prefix = -(-net.prefixlen // step) * step
    zones = []
    for subnet in net.subnets(new_prefix=prefix):
        # reverse_pointer of the first address, less the labels below the prefix.
        labels = subnet.network_address.reverse_pointer.split(".")
        below = (net.max_prefixlen - prefix) // step
        zones.append(".".join(labels[below:]) + ".")
    return zones


def builtin_zone_names() -> list[str]:
    """Every built-in zone's name, ``localhost.`` first."""
    reverse = [zone for network in BUILTIN_NETWORKS for zone in reverse_zones(network)]
    return ["localhost.", *reverse, *BUILTIN_NXDOMAIN_ZONES]


class Router(Generic[T]):
    """Decides, per query, between a local answer and a forward target. Built once per
    configuration (and per hosts-file reading); :meth:`route` allocates nothing.

    ``forwards`` maps zones (lower-cased wire names, :func:`~dot_proxy.core.zones.name_to_wire`)
    to their targets; ``default`` is the target of every other name. ``local_zones=False``
    (``--no-local-zones``) leaves out the built-in zones; the hosts file still answers.
    """

    __slots__ = ("_default", "_hosts", "_reject", "_zones")

    def __init__(
        self,
        *,
        default: T,
        forwards: Mapping[bytes, T] | None = None,
        hosts: HostsTable | None = None,
        local_zones: bool = True,
    ) -> None:
        self._default = Forward(default, ROOT)
        hosts_names = hosts.names if hosts is not None else {}
        table: dict[bytes, Forward[T] | _LocalZone] = {}
        if local_zones:
            table.update(_builtin_zones(hosts_names))
        for zone, target in (forwards or {}).items():
            table[zone] = Forward(target, zone)
        self._zones = ZoneTable(table)
        self._hosts = self._hosts_answers(hosts_names)
        # Every name routed elsewhere than the default ends in one of these top-level domains.
        tlds = {top_level(name) for name in (*table, *self._hosts)}
        self._reject: tuple[bytes, ...] | None = (
            None if ROOT in tlds or len(tlds) > MAX_REJECT_SUFFIXES else tuple(tlds)
        )

    def route(self, question_key: bytes) -> Forward[T] | Local:
        """Where the query whose ``Query.question_key`` this is goes.

        A :class:`Local` to answer with :func:`dot_proxy.core.local_answer.local_answer`, or the
        :class:`Forward` whose ``target`` resolves it.
        """
        reject = self._reject
        # The usual query, for a public name: one endswith on the key, name not even sliced
        # out (a byte match off a label boundary only costs the walk below).
        if reject is not None and not question_key.endswith(reject, 0, len(question_key) - 4):
            return self._default
        name = question_key[:-4]
        qclass = (question_key[-2] << 8) | question_key[-1]
        local_class = qclass in (CLASS_IN, CLASS_ANY)
        if local_class and (answer := self._hosts.get(name)) is not None:
            return answer
        value = self._zones.longest_match(name)
        if value is None:
            return self._default
        if isinstance(value, Forward):
            return value
        # The built-in zones hold class IN data only; their names still never leave.
        if not local_class:
            return value.refused
        return value.names.get(name, value.other)

    def _hosts_answers(self, names: Mapping[bytes, RRsets]) -> dict[bytes, Local]:
        """Each hosts name's answer. The SOA of a negative answer is that of the local zone
        the name is in, or one owned by the name itself, which then answers SOA queries too."""
        answers: dict[bytes, Local] = {}
        shared: dict[Local, Local] = {}
        for name, rrsets in names.items():
            zone = self._zones.longest_match(name)
            if isinstance(zone, _LocalZone):
                answer = Local(Rcode.NOERROR, rrsets, HOSTS_TTL, zone.other.soa)
            else:
                own = ((TYPE_SOA, (_HOSTS_SOA_RDATA,)),)
                answer = Local(
                    Rcode.NOERROR, rrsets + own, HOSTS_TTL, Soa(None, _HOSTS_SOA_RDATA, HOSTS_TTL)
                )
            answers[name] = shared.setdefault(answer, answer)
        return answers


def _builtin_zones(hosts_names: Iterable[bytes]) -> dict[bytes, _LocalZone]:
    apexes = [name_to_wire(zone) for zone in builtin_zone_names()]
    enclosing = ZoneTable({apex: apex for apex in apexes})
    data: dict[bytes, dict[bytes, RRsets]] = {
        apex: {apex: ((TYPE_SOA, (_LOCAL_SOA_RDATA,)), (TYPE_NS, (LOCALHOST,)))} for apex in apexes
    }
    for address in (_LOOPBACK_V4, _LOOPBACK_V6):
        reverse = name_to_wire(address.reverse_pointer)
        zone = enclosing.longest_match(reverse)
        assert zone is not None  # 127/8 and ::1 are built-in networks
        records = data[zone]
        records[reverse] = (*records.get(reverse, ()), (TYPE_PTR, (LOCALHOST,)))
    # A name with names below it exists, empty (RFC 8020 §2: NXDOMAIN would deny its whole
    # subtree): the ancestors, within the zone, of the zone's own data and of hosts names.
    empty: dict[bytes, set[bytes]] = {apex: set() for apex in apexes}
    for name in [*(name for records in data.values() for name in records), *hosts_names]:
        apex = enclosing.longest_match(name)
        if apex is not None:
            for ancestor in ancestors(name):
                if ancestor == apex:
                    break
                empty[apex].add(ancestor)
    return {apex: _builtin_zone(apex, data[apex], empty[apex]) for apex in apexes}


def _builtin_zone(apex: bytes, data: dict[bytes, RRsets], empty: set[bytes]) -> _LocalZone:
    soa = Soa(apex, _LOCAL_SOA_RDATA, LOCAL_TTL)
    nodata = Local(Rcode.NOERROR, (), LOCAL_TTL, soa)
    if apex == LOCALHOST:
        # RFC 6761 §6.3: localhost. and every name under it are the loopback host.
        loopback = ((TYPE_A, (_LOOPBACK_V4.packed,)), (TYPE_AAAA, (_LOOPBACK_V6.packed,)))
        data[apex] += loopback
        other = Local(Rcode.NOERROR, loopback, LOCAL_TTL, soa)
    else:
        other = Local(Rcode.NXDOMAIN, (), LOCAL_TTL, soa)
        data = {**dict.fromkeys(empty, ()), **data}
    names = {
        name: Local(Rcode.NOERROR, rrsets, LOCAL_TTL, soa) if rrsets else nodata
        for name, rrsets in data.items()
    }
    return _LocalZone(names, other, Local(Rcode.REFUSED, (), 0, None))
