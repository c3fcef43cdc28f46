"""Answers made here, sans-I/O: a parsed query and a :class:`~dot_proxy.core.local_zones.Local`
in, the answer's bytes out.

What the client sees is its own: its ID, its question exactly as it wrote it (letter case
included: clients that use 0x20 mixed case compare it), its RD and CD bits (RFC 4035 §3.1.6),
RA set; an OPT record only when it sent one, with its DO bit (RFC 3225 §3) and our payload size
(RFC 6891 §7); cut to its UDP limit with TC set when it does not fit (RFC 1035 §4.2.1). Local
answers are authoritative (AA, as unbound's local zones answer). Answer records are owned by
a compression pointer to the question's name; a negative answer (NXDOMAIN, or NOERROR with no
record of the asked type) carries the zone's SOA in the authority section with TTL
min(TTL, MINIMUM), so that stubs can cache it (RFC 2308 §3, §5).
"""

from __future__ import annotations

import struct
from typing import Final

from dot_proxy.core.local_zones import Local
from dot_proxy.core.message import (
    CLASS_IN,
    EDNS_DO,
    FLAG_AA,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    HEADER,
    HEADER_SIZE,
    OUR_UDP_PAYLOAD,
    TYPE_ANY,
    TYPE_OPT,
    TYPE_SOA,
    Query,
    Rcode,
    truncate_for_udp,
)

__all__ = ["local_answer"]

# RFC 5936 §2.2 / RFC 1995: zone transfers are for authoritative servers' secondaries; the
# local zones are not offered for transfer.
_TRANSFER_TYPES: Final = frozenset({251, 252})  # IXFR, AXFR
# RFC 6891 §6.1.3: BADVERS is extended RCODE 16: 1 in the OPT record's upper eight bits.
_BADVERS_HIGH: Final = 16 >> 4

_RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, RDLENGTH
_OPT_FIXED = struct.Struct("!BHHBBHH")  # root owner, TYPE, CLASS (payload), TTL, RDLENGTH
_QNAME_POINTER: Final = b"\xc0\x0c"  # RFC 1035 §4.1.4: the question's name, at offset 12


def local_answer(query: Query, local: Local, *, udp: bool) -> bytes:
    """The answer to ``query`` from ``local`` (see the module docstring for what it holds).

    ``udp`` cuts it to the client's UDP limit (``query.udp_limit``) with TC set when it does
    not fit. A client OPT record with an EDNS version other than 0 gets BADVERS (RFC 6891
    §6.1.3) and no records; a zone transfer request (AXFR, IXFR) gets REFUSED.
    """
    key = query.question_key
    qtype = (key[-4] << 8) | key[-3]
    client_opt = query.opt
    opt = b""
    extended = 0
    if client_opt is not None:
        if client_opt[6] != 0:  # the OPT TTL's second byte is the EDNS VERSION
            extended = _BADVERS_HIGH
        do_bit = ((client_opt[7] << 8) | client_opt[8]) & EDNS_DO
        opt = _OPT_FIXED.pack(0, TYPE_OPT, OUR_UDP_PAYLOAD, extended, 0, do_bit, 0)
    rcode = local.rcode
    if qtype in _TRANSFER_TYPES:
        rcode = Rcode.REFUSED
    records: list[bytes] = []
    authority = b""
    if extended:
        rcode = Rcode.NOERROR  # the whole code is in the OPT record and the header's low bits
    elif rcode != Rcode.REFUSED:
        records = _records(local, qtype)
        if not records and local.soa is not None:
            authority = _soa_record(local, key)
    flags = FLAG_QR | FLAG_RA | (query.flags & (FLAG_RD | FLAG_CD)) | rcode
    if rcode != Rcode.REFUSED and not extended:
        flags |= FLAG_AA
    header = HEADER.pack(query.id, flags, 1, len(records), 1 if authority else 0, 1 if opt else 0)
    answer = b"".join((header, query.question, *records, authority, opt))
    return truncate_for_udp(answer, query.udp_limit) if udp else answer


def _records(local: Local, qtype: int) -> list[bytes]:
    ttl = local.ttl
    return [
        _QNAME_POINTER + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata
        for rtype, rdatas in local.rrsets
        if qtype in (rtype, TYPE_ANY)
        for rdata in rdatas
    ]


def _soa_record(local: Local, key: bytes) -> bytes:
    soa = local.soa
    assert soa is not None
    name = key[:-4]
    if soa.apex is None:
        owner = _QNAME_POINTER
    elif name.endswith(soa.apex):
        # The apex is a suffix of the question's name on a label boundary (the zone matched
        # on labels): point into the question rather than repeat it.
        owner = (0xC000 | (HEADER_SIZE + len(name) - len(soa.apex))).to_bytes(2, "big")
    else:
        owner = soa.apex
    return owner + _RR_FIXED.pack(TYPE_SOA, CLASS_IN, soa.ttl, len(soa.rdata)) + soa.rdata
