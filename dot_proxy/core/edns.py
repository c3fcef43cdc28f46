"""EDNS(0) padding, sans-I/O: pad queries for the TLS hop, strip padding from answers.

RFC 7830 defines the Padding option (code 12, zero bytes); RFC 8467 §4.1 recommends padding
queries to a multiple of 128 bytes (and responses to 468, which is what unbound does when the
query was padded). Padding only hides sizes on the encrypted hop: answers are stripped of it
before they go back to the client in cleartext, where it only costs bytes and can push a UDP
answer over the client's limit (RFC 7830 limits padding to encrypted transports).

Like :mod:`dot_proxy.core.message`, this module takes bytes and returns bytes: no trio, no sockets,
no clock. Messages are walked record by record with the wire module's helpers, which read only names
and record headers; record data is never parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from typing import Final

from dot_proxy.core.message import (
    HEADER,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    OUR_UDP_PAYLOAD,
    TYPE_OPT,
    Rcode,
    RecordsLayout,
    records_layout,
)
from dot_proxy.core.message import question_end as end_of_question
from dot_proxy.errors import WireError

__all__ = [
    "OPTION_ECS",
    "OPTION_PADDING",
    "QUERY_BLOCK",
    "RESPONSE_BLOCK",
    "drop_options",
    "message_layout",
    "option_spans",
    "pad_query",
    "strip_padding",
]

#: The EDNS(0) Padding option code (RFC 7830 §3).
OPTION_PADDING: Final = 12
#: The EDNS Client Subnet option code (RFC 7871 §6); see :mod:`dot_proxy.core.ecs`.
OPTION_ECS: Final = 8
#: RFC 8467 §4.1: clients pad queries to a multiple of 128 bytes.
QUERY_BLOCK: Final = 128
#: RFC 8467 §4.1: servers pad responses to a multiple of 468 bytes.
RESPONSE_BLOCK: Final = 468

# An OPT record is the root name (one zero byte), then TYPE, CLASS (UDP payload), TTL (extended
# RCODE, version, flags) and RDLENGTH: 11 bytes before its options (RFC 6891 §6.1.2).
_OPT_FIXED: Final = 11
_RDLENGTH_AT: Final = 9
_OPTION_HEADER = struct.Struct("!HH")  # OPTION-CODE, OPTION-LENGTH (RFC 6891 §6.1.2)
_PADDING_CODE: Final = OPTION_PADDING.to_bytes(2, "big")
_ECS_CODE: Final = OPTION_ECS.to_bytes(2, "big")
_PADDING_ONLY: Final = frozenset({OPTION_PADDING})
_PADDING_AND_ECS: Final = frozenset({OPTION_PADDING, OPTION_ECS})
# QDCOUNT 1, ANCOUNT, NSCOUNT and ARCOUNT 0.
_ONE_QUESTION_ONLY: Final = b"\x00\x01\x00\x00\x00\x00\x00\x00"
# The OPT record we add: root owner, TYPE 41, our UDP payload size, TTL 0 (no flags).
_ADDED_OPT_FIXED: Final = b"\x00" + struct.pack("!HHI", TYPE_OPT, OUR_UDP_PAYLOAD, 0)
_ARCOUNT_AT: Final = 10


def _padding_tail(pad: int) -> bytes:
    """An OPT record's RDLENGTH and RDATA holding only a Padding option of ``pad`` zero bytes."""
    return (
        (_OPTION_HEADER.size + pad).to_bytes(2, "big")
        + _OPTION_HEADER.pack(OPTION_PADDING, pad)
        + bytes(pad)
    )


# Every tail a default-block query can need, built once.
_QUERY_BLOCK_TAILS: Final = tuple(_padding_tail(pad) for pad in range(QUERY_BLOCK))


def pad_query(
    message: bytes, *, block: int = QUERY_BLOCK, question_end: int | None = None
) -> tuple[bytes, bool]:
    """Pad a query to a multiple of ``block`` bytes (RFC 7830, RFC 8467 §4.1).

    Returns the padded query and whether an OPT record was *added* because the client sent
    none; the caller then removes it from the answer with ``strip_padding(answer,
    remove_opt=True)``. The Padding option holds the fewest zero bytes that make the length a
    multiple of ``block`` (possibly none). A Padding option the client sent is replaced; its
    other options, flags (DO) and payload size are kept in order. An added OPT advertises a
    1,232-byte payload with no flags. Bytes after the last record are dropped.

    Signed queries (TSIG, SIG(0)) and queries that cannot be padded within 65,535 bytes are
    returned as they are (the same object), with ``False``. ``question_end``, where the
    query's one question ends, saves walking it again when the caller has parsed the query
    (``HEADER_SIZE + len(parse_query(message).question)``).

    Error handling: raises :class:`WireError` (FORMERR) when the records, the OPT record or its
    options cannot be walked, and :class:`ValueError` for a ``block`` outside 1..65535.
    """
    if not 1 <= block <= MAX_MESSAGE_SIZE:
        raise ValueError(f"padding block must be 1..{MAX_MESSAGE_SIZE}, not {block}")
    if message[4:12] == _ONE_QUESTION_ONLY:
        # The common query, one question and no records (what most stubs and dnsperf send):
        # no record to walk, so add the OPT record directly. Same bytes as the general path.
        end = question_end or end_of_question(message, HEADER_SIZE)
        pad = -(end + _OPT_FIXED + _OPTION_HEADER.size) % block
        tail = _QUERY_BLOCK_TAILS[pad] if block == QUERY_BLOCK else _padding_tail(pad)
        return message[:10] + b"\x00\x01" + message[HEADER_SIZE:end] + _ADDED_OPT_FIXED + tail, True
    records_end, opt, signed = message_layout(message, question_end)
    if signed:
        return message, False
    if opt is None:
        before = _add_to_arcount(message[:records_end], +1)
        fixed = b"\x00" + struct.pack("!HHI", TYPE_OPT, OUR_UDP_PAYLOAD, 0)
        options, after = b"", b""
    else:
        start, end = opt
        before = message[:start]
        fixed = message[start : start + _RDLENGTH_AT]
        options = _options_without(message[start + _OPT_FIXED : end], _PADDING_ONLY)
        after = message[end:records_end]
    unpadded = len(before) + _OPT_FIXED + len(options) + _OPTION_HEADER.size + len(after)
    pad = -unpadded % block
    if unpadded + pad > MAX_MESSAGE_SIZE:
        return message, False
    rdata = options + _OPTION_HEADER.pack(OPTION_PADDING, pad) + bytes(pad)
    return before + fixed + len(rdata).to_bytes(2, "big") + rdata + after, opt is None


def strip_padding(
    answer: bytes, *, remove_opt: bool, question_end: int | None = None, ecs: bool = False
) -> bytes:
    """Remove the Padding option from an upstream's answer before it goes back in cleartext.

    Other options (cookies, NSID, Extended DNS Errors, ...) are kept in order and the OPT
    record's RDLENGTH fixed (RFC 7830: padding is for encrypted transports only). With
    ``remove_opt`` (the client sent no OPT and :func:`pad_query` added one), the whole OPT
    record goes and ARCOUNT drops by one, so the client sees no EDNS it did not ask for
    (RFC 6891 §7). The OPT record may sit anywhere in the additional section (before TSIG).

    Returns ``answer`` itself when there is nothing to do: no additional records, no OPT
    record, or no Padding option and not ``remove_opt``. ``question_end``, where the answer's
    one question ends, saves walking it again (this runs on every answer): for an answer that
    matched a query's question key, ``HEADER_SIZE + len(key)``.

    With ``ecs``, an EDNS Client Subnet option goes too, in the same walk (RFC 7871 §7.2.1:
    an answer's ECS option is about the query that carried one, ours, not the client's).

    Error handling: never raises for malformed input; an answer that cannot be walked, that has
    more than one OPT record, or whose options overrun the OPT record is returned unchanged
    (it already passed the caller's matching and is the upstream's business).
    """
    if len(answer) < HEADER_SIZE or not (answer[_ARCOUNT_AT] or answer[_ARCOUNT_AT + 1]):
        return answer
    # Cheap and sound: a Padding option always writes its code, so without those two bytes
    # anywhere there is nothing to strip and no need to walk the records.
    if not remove_opt and _PADDING_CODE not in answer and not (ecs and _ECS_CODE in answer):
        return answer
    try:
        opt = message_layout(answer, question_end)[1]
    except WireError:
        return answer
    if opt is None:
        return answer
    if remove_opt:
        start, end = opt
        return _add_to_arcount(answer[:start], -1) + answer[end:]
    try:
        return drop_options(answer, opt, _PADDING_AND_ECS if ecs else _PADDING_ONLY)
    except WireError:
        return answer


def drop_options(message: bytes, opt: tuple[int, int], codes: Collection[int]) -> bytes:
    """``message`` with the options whose code is in ``codes`` left out of its OPT record
    (at ``opt``, as :func:`message_layout` finds it), the rest kept in order; ``message``
    itself when none is there.

    Error handling: raises :class:`WireError` (FORMERR) when an option runs past the record.
    """
    start, end = opt
    rdata = message[start + _OPT_FIXED : end]
    kept = _options_without(rdata, codes)
    if len(kept) == len(rdata):
        return message
    fixed = message[: start + _RDLENGTH_AT]
    return fixed + len(kept).to_bytes(2, "big") + kept + message[end:]


# --- walking -------------------------------------------------------------------------------


def message_layout(message: bytes, records_from: int | None = None) -> RecordsLayout:
    """:func:`~dot_proxy.core.message.records_layout` of a whole message.

    ``records_from`` is where the question section ends, when the caller knows it already
    (an answer matched to a one-question query): the question is not walked again. A signed
    message (TSIG, SIG(0)) is reported so: changing it would break its signature.
    """
    if len(message) < HEADER_SIZE:
        raise WireError("shorter than a DNS header", rcode=Rcode.FORMERR)
    _, _, qdcount, ancount, nscount, arcount = HEADER.unpack_from(message)
    if records_from is not None and qdcount == 1:
        offset = records_from
    else:
        offset = HEADER_SIZE
        for _ in range(qdcount):
            offset = end_of_question(message, offset)
    return records_layout(message, offset, ancount, nscount, arcount)


def option_spans(rdata: bytes) -> list[tuple[int, int, int]]:
    """Each EDNS option of an OPT record's RDATA as ``(code, start, end)``, in order.

    RFC 6891 §6.1.2: OPTION-CODE, OPTION-LENGTH, then that many bytes of data.

    Error handling: raises :class:`WireError` (FORMERR) when an option runs past the record.
    """
    spans: list[tuple[int, int, int]] = []
    offset, end = 0, len(rdata)
    while offset < end:
        if offset + _OPTION_HEADER.size > end:
            raise WireError("EDNS option header runs past the OPT record", rcode=Rcode.FORMERR)
        code, length = _OPTION_HEADER.unpack_from(rdata, offset)
        option_end = offset + _OPTION_HEADER.size + length
        if option_end > end:
            raise WireError("EDNS option runs past the OPT record", rcode=Rcode.FORMERR)
        spans.append((code, offset, option_end))
        offset = option_end
    return spans


def _options_without(rdata: bytes, codes: Collection[int]) -> bytes:
    """An OPT record's options with every one whose code is in ``codes`` left out, the rest
    in order (RFC 7830 allows one Padding option per OPT record; a second goes all the same).
    """
    if not rdata:
        return rdata
    if (
        rdata[:2] == _PADDING_CODE
        and OPTION_PADDING in codes
        and len(rdata) == 4 + int.from_bytes(rdata[2:4], "big")
    ):
        return b""  # the usual padded answer: padding is its only option
    return b"".join(
        rdata[start:end] for code, start, end in option_spans(rdata) if code not in codes
    )


def _add_to_arcount(message: bytes, delta: int) -> bytes:
    """The message (at least a header) with ``delta`` added to its ARCOUNT (RFC 1035 §4.1.1)."""
    arcount = (message[_ARCOUNT_AT] << 8) | message[_ARCOUNT_AT + 1]
    return message[:_ARCOUNT_AT] + (arcount + delta).to_bytes(2, "big") + message[HEADER_SIZE:]
