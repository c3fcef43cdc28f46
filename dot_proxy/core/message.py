"""DNS wire format, sans-I/O: bytes in, values or bytes out.

Only what a forwarder needs: read a query's header, question and EDNS OPT record; match an
answer to its query; rewrite IDs; build error answers; truncate for UDP. (Length-prefixed
framing for TCP and TLS is :mod:`dot_proxy.core.framing`.) Nothing here imports trio, touches a
socket or reads the clock, so every function is tested directly (tests/test_wire.py, dnspython
as the oracle).

Messages are handled as ``bytes`` and parsed only as deep as needed: a forwarder passes answers
through untouched, so walking every record of every answer would be wasted work on the hot path.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

from dot_proxy.errors import WireError

__all__ = [
    "CLASS_ANY",
    "CLASS_IN",
    "HEADER",
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "SIGNATURE_TYPES",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_ANY",
    "TYPE_NS",
    "TYPE_OPT",
    "TYPE_PTR",
    "TYPE_SOA",
    "Query",
    "Rcode",
    "RecordsLayout",
    "answer_matches",
    "answer_question_key",
    "error_reply",
    "message_id",
    "name_end",
    "parse_query",
    "question_end",
    "rcode_name",
    "record_at",
    "records_layout",
    "replace_id",
    "truncate_for_udp",
]

HEADER_SIZE: Final = 12
MAX_MESSAGE_SIZE: Final = 65535
# RFC 1035 §4.2.1: without EDNS a UDP answer is at most 512 bytes.
CLASSIC_UDP_LIMIT: Final = 512
# The payload size we advertise in OPT records we make ourselves (DNS flag day 2020).
OUR_UDP_PAYLOAD: Final = 1232

# Record types and classes (RFC 1035 §3.2.2-3.2.5, RFC 3596, RFC 6891).
TYPE_A: Final = 1
TYPE_NS: Final = 2
TYPE_SOA: Final = 6
TYPE_PTR: Final = 12
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
TYPE_ANY: Final = 255
CLASS_IN: Final = 1
CLASS_ANY: Final = 255
MAX_NAME_LENGTH: Final = 255

# Header flag bits (RFC 1035 §4.1.1, RFC 4035 §3.2 for AD/CD).
FLAG_QR: Final = 0x8000
FLAG_AA: Final = 0x0400
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
FLAG_CD: Final = 0x0010
OPCODE_MASK: Final = 0x7800
RCODE_MASK: Final = 0x000F
# EDNS flags live in the OPT record's TTL field (RFC 6891 §6.1.3); DO is the top bit.
EDNS_DO: Final = 0x8000

#: ID, flags, QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT (RFC 1035 §4.1.1).
HEADER: Final = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength


class Rcode(enum.IntEnum):
    """Response codes this proxy produces itself (RFC 1035 §4.1.1)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class Query(NamedTuple):
    """What the proxy needs to know about a client's query.

    Immutable, and a NamedTuple rather than a frozen dataclass: one is built per query, and a
    frozen dataclass's ``__init__`` costs about four times as much.

    ``question`` is the question section as the client sent it (name, type, class) and
    ``question_key`` the same with the name lower-cased, for matching answers (RFC 4343: names
    compare case-insensitively). ``udp_limit`` is the largest UDP answer the client accepts.
    ``opt`` is the client's OPT record verbatim, or ``None`` when it sent none.
    """

    id: int
    flags: int
    question: bytes
    question_key: bytes
    udp_limit: int
    opt: bytes | None

    @property
    def dnssec_ok(self) -> bool:
        """Whether the client set the EDNS DO bit."""
        return self.opt is not None and bool(_opt_flags(self.opt) & EDNS_DO)


def parse_query(data: bytes) -> Query:
    """Validate a client's query and return what the proxy needs of it.

    Error handling: raises :class:`WireError` whose ``rcode`` says how to answer: FORMERR for a
    malformed query, NOTIMP for an opcode other than QUERY, and ``None`` (drop silently) when
    not even the header is readable or the message is a response (QR set).
    """
    if len(data) < HEADER_SIZE:
        raise WireError("shorter than a DNS header", rcode=None)
    msg_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        # A response is no query (RFC 1035 §7.3 has a resolver discard what it did not ask
        # for). Answering one makes the proxy a reflector for spoofed sources and lets two
        # servers bounce messages at each other: dropped, whatever its rcode.
        raise WireError("response received as a query", rcode=None)
    if flags & OPCODE_MASK:
        raise WireError("opcode is not QUERY", rcode=Rcode.NOTIMP)
    if qdcount != 1:
        raise WireError(f"{qdcount} questions, expected 1", rcode=Rcode.FORMERR)
    end = question_end(data, HEADER_SIZE)
    question = data[HEADER_SIZE:end]
    question_key = question[:-4].lower() + question[-4:]
    opt: bytes | None = None
    if ancount or nscount or arcount:
        opt_span = records_layout(data, end, ancount, nscount, arcount)[1]
        if opt_span is not None:
            opt = data[opt_span[0] : opt_span[1]]
    udp_limit = CLASSIC_UDP_LIMIT if opt is None else max(CLASSIC_UDP_LIMIT, _opt_payload(opt))
    return Query(msg_id, flags, question, question_key, udp_limit, opt)


def error_reply(query: bytes | Query, rcode: int) -> bytes | None:
    """Build the answer with ``rcode`` that the proxy itself gives to a query.

    Takes the parsed query or, for a query that failed to parse, its raw bytes; then the
    question is echoed when it can be read and left out otherwise. Returns ``None`` when the
    raw bytes are shorter than a header (there is nothing to reply to). The answer sets RA
    (we are a recursive service), copies RD and CD, and carries an OPT record when the
    client sent one (RFC 6891 §7: a responder that understands EDNS includes OPT).
    """
    if isinstance(query, Query):
        return _error_message(query.id, query.flags, rcode, query.question, query.opt)
    if len(query) < HEADER_SIZE:
        return None
    msg_id, flags, qdcount, *_ = HEADER.unpack_from(query)
    question = b""
    if qdcount == 1:
        try:
            question = query[HEADER_SIZE : question_end(query, HEADER_SIZE)]
        except WireError:
            question = b""
    return _error_message(msg_id, flags, rcode, question, None)


def _error_message(
    msg_id: int, query_flags: int, rcode: int, question: bytes, client_opt: bytes | None
) -> bytes:
    flags = FLAG_QR | FLAG_RA | (query_flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | rcode
    arcount = 0 if client_opt is None else 1
    header = HEADER.pack(msg_id, flags, 1 if question else 0, 0, 0, arcount)
    if client_opt is None:
        return header + question
    do_bit = _opt_flags(client_opt) & EDNS_DO
    opt = b"\x00" + _RR_FIXED.pack(TYPE_OPT, OUR_UDP_PAYLOAD, do_bit, 0)
    return header + question + opt


def rcode_name(message: bytes) -> str:
    """The RCODE in ``message``'s header by its RFC 1035 name (``NOERROR``, ...), or
    ``rcode N`` for one that is not an :class:`Rcode`; for what a person reads."""
    code = message[3] & RCODE_MASK
    try:
        return Rcode(code).name
    except ValueError:
        return f"rcode {code}"


def message_id(message: bytes) -> int:
    """The 16-bit ID of a message at least two bytes long."""
    return (message[0] << 8) | message[1]


def replace_id(message: bytes, new_id: int) -> bytes:
    """The same message with its ID set to ``new_id``."""
    return new_id.to_bytes(2, "big") + message[2:]


def answer_question_key(answer: bytes) -> bytes | None:
    """The matching key of an answer's question, or ``None`` if it is no usable answer.

    ``None`` when the message is not a response (QR clear), does not carry exactly one
    question, or the question cannot be read: RFC 7858 §3.3 matches by ID *and* question, and an
    answer that cannot be matched must be discarded, never passed on.
    """
    if len(answer) < HEADER_SIZE:
        return None
    _, flags, qdcount, *_ = HEADER.unpack_from(answer)
    if not flags & FLAG_QR or qdcount != 1:
        return None
    try:
        end = question_end(answer, HEADER_SIZE)
    except WireError:
        return None
    return answer[HEADER_SIZE : end - 4].lower() + answer[end - 4 : end]


def answer_matches(answer: bytes, question_key: bytes) -> bool:
    """Whether ``answer`` is a response to the question whose key is ``question_key``.

    The same as ``answer_question_key(answer) == question_key`` for a key made by
    :func:`parse_query` (a whole, well-formed question), but an answer that repeats
    the question byte for byte (the usual case: lower-case names, no 0x20 mixing) is matched
    without walking its name: a name's labels chain unambiguously, so equal bytes up to the
    key's end are an equal question.
    """
    if (
        answer[HEADER_SIZE : HEADER_SIZE + len(question_key)] == question_key
        and len(answer) >= HEADER_SIZE
        and answer[2] & 0x80
        and answer[4] == 0
        and answer[5] == 1
    ):
        return True
    return answer_question_key(answer) == question_key


def truncate_for_udp(answer: bytes, limit: int) -> bytes:
    """Fit an answer into a UDP payload of ``limit`` bytes.

    An answer that fits is returned as it is. One that does not becomes its header and question
    with TC set and no records but the OPT record (RFC 1035 §4.2.1, RFC 2181 §9: the client
    retries over TCP; RFC 6891 §7: keep OPT so the client still sees EDNS). The cut is at a
    section boundary, never mid-record, so a client never gets a partial RRset.
    """
    if len(answer) <= limit:
        return answer
    msg_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(answer)
    offset = HEADER_SIZE
    try:
        for _ in range(qdcount):
            offset = question_end(answer, offset)
        opt_span = records_layout(answer, offset, ancount, nscount, arcount)[1]
    except WireError:
        # An answer we cannot walk still gets a well-formed TC reply with no records.
        return HEADER.pack(msg_id, flags | FLAG_TC, 0, 0, 0, 0)
    opt = None if opt_span is None else answer[opt_span[0] : opt_span[1]]
    questions_end = offset
    question = answer[HEADER_SIZE:questions_end]
    if opt is not None and len(opt) > 11 and HEADER_SIZE + len(question) + len(opt) > limit:
        opt = opt[:9] + b"\x00\x00"  # keep the OPT record, drop its options
    if HEADER_SIZE + len(question) + len(opt or b"") > limit:
        # Several long questions (qdcount > 1) can outgrow the limit on their own: drop them.
        qdcount, question = 0, b""
    header = HEADER.pack(msg_id, flags | FLAG_TC, qdcount, 0, 0, 0 if opt is None else 1)
    return header + question + (opt or b"")


# --- walking names and records -------------------------------------------------------------
# The one walker over resource records: record_at() finds one record's fields, and
# records_layout() walks the answer, authority and additional sections with it. Everything
# that reads records (parse_query, truncate_for_udp, core.edns, core.cache) goes through them.

#: Signature records that close the message they sign (RFC 8945 TSIG, RFC 2931 SIG(0)).
SIGNATURE_TYPES: Final = frozenset({24, 250})

#: What :func:`records_layout` finds: where the last record ends, the OPT record's
#: ``(start, end)`` or ``None``, and whether the additional section holds a signature.
RecordsLayout = tuple[int, tuple[int, int] | None, bool]


def name_end(data: bytes, offset: int, *, allow_pointer: bool = True) -> int:
    """Offset just past the (possibly compressed) name starting at ``offset``.

    Error handling: raises :class:`WireError` (FORMERR) for a name that runs past the end, is
    longer than 255 bytes, uses an unknown label type, or points when ``allow_pointer`` is off.
    """
    length = 0
    end = len(data)
    while True:
        if offset >= end:
            raise WireError("name runs past the end of the message", rcode=Rcode.FORMERR)
        label = data[offset]
        if label == 0:
            return offset + 1
        if label >= 0xC0:
            if not allow_pointer:
                raise WireError("compression pointer in a question", rcode=Rcode.FORMERR)
            if offset + 2 > end:
                raise WireError("pointer runs past the end", rcode=Rcode.FORMERR)
            return offset + 2
        if label > 63:
            raise WireError("unknown label type", rcode=Rcode.FORMERR)
        length += label + 1
        if length + 1 > MAX_NAME_LENGTH:
            raise WireError("name longer than 255 bytes", rcode=Rcode.FORMERR)
        offset += label + 1


def question_end(data: bytes, offset: int) -> int:
    """Offset just past the question (name, type, class) that starts at ``offset``.

    Error handling: as :func:`name_end`; the first question's name may not be compressed.
    """
    # A question's name is the first in a message: there is nothing before it to point to.
    end = name_end(data, offset, allow_pointer=offset != HEADER_SIZE) + 4
    if end > len(data):
        raise WireError("question runs past the end of the message", rcode=Rcode.FORMERR)
    return end


def record_at(data: bytes, offset: int) -> tuple[int, int]:
    """``(fixed, end)`` of the resource record that starts at ``offset`` (RFC 1035 §4.1.3).

    ``fixed`` is where its TYPE is: CLASS follows at ``fixed + 2``, TTL at ``fixed + 4``,
    RDLENGTH at ``fixed + 8`` and RDATA from ``fixed + 10`` to ``end``, where the next record
    starts. Record data is never parsed.

    Error handling: raises :class:`WireError` (FORMERR) when the record runs past the end.
    """
    size = len(data)
    if offset >= size:
        raise WireError("record runs past the end of the message", rcode=Rcode.FORMERR)
    # The two usual owner names, a compression pointer and the root, are skipped here; any
    # other goes through the full check. This runs for every record of every answer.
    label = data[offset]
    if label >= 0xC0:
        fixed = offset + 2
    elif label == 0:
        fixed = offset + 1
    else:
        fixed = name_end(data, offset)
    if fixed + 10 > size:
        raise WireError("record runs past the end of the message", rcode=Rcode.FORMERR)
    end = fixed + 10 + ((data[fixed + 8] << 8) | data[fixed + 9])
    if end > size:
        raise WireError("record data runs past the end of the message", rcode=Rcode.FORMERR)
    return fixed, end


def records_layout(
    message: bytes, offset: int, ancount: int, nscount: int, arcount: int
) -> RecordsLayout:
    """Walk the records from ``offset`` (where the question section ends) to the last one.

    Returns where the last record ends, the OPT record's span, and whether the additional
    section is signed (TSIG or SIG(0)). Bytes after the last record are not looked at.

    Error handling: raises :class:`WireError` (FORMERR) for a record that runs past the end,
    more than one OPT record, or one not owned by the root (RFC 6891 §6.1.1).
    """
    for _ in range(ancount + nscount):
        offset = record_at(message, offset)[1]
    opt: tuple[int, int] | None = None
    signed = False
    for _ in range(arcount):
        start = offset
        fixed, offset = record_at(message, start)
        rr_type = (message[fixed] << 8) | message[fixed + 1]
        if rr_type == TYPE_OPT:
            if opt is not None:
                raise WireError("more than one OPT record", rcode=Rcode.FORMERR)
            if message[start] != 0:
                raise WireError("OPT record not owned by the root", rcode=Rcode.FORMERR)
            opt = (start, offset)
        elif rr_type in SIGNATURE_TYPES:
            signed = True
    return offset, opt, signed


def _opt_payload(opt: bytes) -> int:
    # OPT's owner is the root name (one zero byte); CLASS holds the UDP payload size.
    return (opt[3] << 8) | opt[4]


def _opt_flags(opt: bytes) -> int:
    # TTL = extended RCODE (8 bits), version (8 bits), flags (16 bits).
    return (opt[7] << 8) | opt[8]
