"""EDNS Client Subnet (RFC 7871), sans-I/O: remove the option from queries and answers.

A client's ECS option tells every resolver on the way, and the authoritative servers behind
them, which network the query came from (RFC 7871 §11.1: a privacy cost). The option is
removed from a query before it goes upstream, and from an answer before it goes back to the
client (the client's option was not sent, so an answer's option is about our query, not the
client's; RFC 7871 §7.2.1 also says an answer carries one only when the query did).

Removed, rather than replaced by an option with SOURCE PREFIX-LENGTH 0 (RFC 7871 §7.1.2, what
stubby's ``edns_client_subnet_private`` sends), because then a query that carried ECS leaves
exactly as one that did not: one privacy rule for every query, and one cache entry (the answer
cache does not serve or keep a query that carries ECS). A /0 option on *every* query is a
separate choice, which would also ask ECS-speaking upstreams not to add our own address.

Signed queries (TSIG, SIG(0)) are left as they are: changing them breaks the signature, and
their sender vouched for their options. The record walk here is a copy of the one in
:mod:`dot_proxy.core.edns`, kept apart while that module is being reworked.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["OPTION_ECS", "strip_ecs"]

#: The EDNS Client Subnet option code (RFC 7871 §6).
OPTION_ECS: Final = 8

_HEADER_SIZE: Final = 12
_TYPE_OPT: Final = 41
_TYPE_SIG: Final = 24
_TYPE_TSIG: Final = 250
_OPT_FIXED: Final = 11  # root owner, TYPE, CLASS, TTL, RDLENGTH (RFC 6891 §6.1.2)
_RDLENGTH_AT: Final = 9
_OPTION_HEADER = struct.Struct("!HH")  # OPTION-CODE, OPTION-LENGTH
_HEADER = struct.Struct("!HHHHHH")
_ECS_CODE: Final = OPTION_ECS.to_bytes(2, "big")


def strip_ecs(message: bytes) -> bytes:
    """The message without any ECS option in its OPT record; other options kept in order.

    Returns ``message`` itself when there is nothing to remove (no OPT record, no ECS option),
    when it is signed, or when it cannot be walked (it is passed on as it is, for the next hop
    to judge). The OPT record stays, with its flags, even when ECS was its only option.
    """
    # Cheap and sound: an ECS option always writes its code, so without those two bytes
    # anywhere there is nothing to remove and no need to walk the records.
    if _ECS_CODE not in message:
        return message
    span = _opt_span(message)
    if span is None:
        return message
    start, end = span
    rdata = message[start + _OPT_FIXED : end]
    kept = _without_ecs(rdata)
    if kept is None or len(kept) == len(rdata):
        return message
    return message[: start + _RDLENGTH_AT] + len(kept).to_bytes(2, "big") + kept + message[end:]


def _without_ecs(rdata: bytes) -> bytes | None:
    """The options other than ECS, in order; ``None`` if they overrun the OPT record."""
    kept: list[bytes] = []
    offset, end = 0, len(rdata)
    while offset < end:
        if offset + _OPTION_HEADER.size > end:
            return None
        code, length = _OPTION_HEADER.unpack_from(rdata, offset)
        option_end = offset + _OPTION_HEADER.size + length
        if option_end > end:
            return None
        if code != OPTION_ECS:
            kept.append(rdata[offset:option_end])
        offset = option_end
    return b"".join(kept)


def _opt_span(message: bytes) -> tuple[int, int] | None:
    """Where the one OPT record is, or ``None`` (none, several, signed, or unwalkable)."""
    if len(message) < _HEADER_SIZE:
        return None
    _, _, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(message)
    offset = _HEADER_SIZE
    for _ in range(qdcount):
        name_end = _name_end(message, offset)
        if name_end is None:
            return None
        offset = name_end + 4
    span: tuple[int, int] | None = None
    for index in range(ancount + nscount + arcount):
        start = offset
        fixed = _name_end(message, start)
        if fixed is None or fixed + 10 > len(message):
            return None
        offset = fixed + 10 + ((message[fixed + 8] << 8) | message[fixed + 9])
        if offset > len(message):
            return None
        if index < ancount + nscount:
            continue
        rtype = (message[fixed] << 8) | message[fixed + 1]
        if rtype in (_TYPE_TSIG, _TYPE_SIG):
            return None
        if rtype == _TYPE_OPT:
            # RFC 6891 §6.1.1: one OPT record at most, owned by the root.
            if span is not None or message[start] != 0:
                return None
            span = (start, offset)
    return span


def _name_end(message: bytes, offset: int) -> int | None:
    """Offset just past the (possibly compressed) name at ``offset``; ``None`` if broken."""
    end = len(message)
    while offset < end:
        length = message[offset]
        if length == 0:
            return offset + 1
        if length >= 0xC0:
            return offset + 2 if offset + 2 <= end else None
        if length > 63:
            return None
        offset += length + 1
    return None
