"""Pure tests of :mod:`dot_proxy.core.message`: no event loop, dnspython as oracle, hypothesis.

Every message under test is either made by dnspython (and then read back by it to say what the
right answer is) or built by hand next to the RFC rule it breaks. Hypothesis covers what no list of
examples can: odd label bytes, every size and limit, every way a byte stream can be split.
"""

from __future__ import annotations

import io
import ipaddress
import struct
from collections.abc import Sequence

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame, frame_with_id
from dot_proxy.core.message import (
    MAX_MESSAGE_SIZE,
    Query,
    Rcode,
    answer_matches,
    answer_question_key,
    error_reply,
    message_id,
    parse_query,
    replace_id,
    truncate_for_udp,
)
from dot_proxy.errors import WireError

# Hypothesis budgets: enough examples to find edge cases, few enough that the whole file runs in
# seconds on a busy CI machine. No deadlines: a loaded machine must not turn into a flaky test.
SOME = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADER = struct.Struct("!HHHHHH")
QR = int(dns.flags.QR)
TC = int(dns.flags.TC)
RD = int(dns.flags.RD)
RA = int(dns.flags.RA)
AD = int(dns.flags.AD)
CD = int(dns.flags.CD)
DO = int(dns.flags.DO)
OPCODE_BITS = 0x7800
RCODE_BITS = 0x000F
TYPE_OPT = 41
IN = dns.rdataclass.IN
TXT = dns.rdatatype.TXT

# --- strategies ----------------------------------------------------------------------------------

_HOSTNAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"

# RFC 2181 §11: a label is any 1..63 octets, dots, backslashes and NULs included; names compare
# ASCII-case-insensitively (RFC 4343), so plenty of mixed-case letters too.
labels = st.one_of(
    st.text(alphabet=_HOSTNAME_CHARS, min_size=1, max_size=63).map(str.encode),
    st.binary(min_size=1, max_size=63),
)


@st.composite
def dns_names(draw: st.DrawFn) -> dns.name.Name:
    """Absolute names whose wire form is at most 255 bytes (RFC 1035 §2.3.4).

    Labels that would overflow are shortened to fit, so names of exactly 255 bytes come up.
    """
    room = 254  # 255 minus the root label's zero byte
    kept: list[bytes] = []
    for label in draw(st.lists(labels, max_size=10)):
        if room < 2:
            break
        kept.append(label[: room - 1])
        room -= len(kept[-1]) + 1
    return dns.name.Name([*kept, b""])


common_types = [1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 43, 48, 64, 65, 250, 251, 252, 255, 257]
rdtypes = st.one_of(st.sampled_from(common_types), st.integers(0, 0xFFFF)).map(
    dns.rdatatype.RdataType.make
)
rdclasses = st.one_of(st.sampled_from([1, 3, 4, 254, 255]), st.integers(0, 0xFFFF)).map(
    dns.rdataclass.RdataClass.make
)
query_flags = st.sets(st.sampled_from([RD, CD, AD])).map(sum)


def _ecs(address: ipaddress.IPv4Address | ipaddress.IPv6Address, bits: int) -> dns.edns.Option:
    return dns.edns.ECSOption(str(address), bits % (address.max_prefixlen + 1))


edns_options = st.lists(
    st.one_of(
        st.builds(
            dns.edns.CookieOption,
            st.binary(min_size=8, max_size=8),
            st.one_of(st.just(b""), st.binary(min_size=8, max_size=32)),
        ),
        st.builds(_ecs, st.ip_addresses(), st.integers(0, 128)),
        st.integers(0, 300).map(
            lambda n: dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * n)
        ),
        st.builds(dns.edns.GenericOption, st.integers(0xFDE9, 0xFFFE), st.binary(max_size=40)),
    ),
    max_size=4,
)


@st.composite
def queries(draw: st.DrawFn) -> dns.message.QueryMessage:
    """A client query as dnspython makes it: any name, type and class; EDNS or not."""
    name = draw(dns_names())
    rdtype, rdclass = draw(rdtypes), draw(rdclasses)
    msg_id, flags = draw(st.integers(0, 0xFFFF)), draw(query_flags)
    if not draw(st.booleans()):
        return dns.message.make_query(name, rdtype, rdclass, use_edns=False, id=msg_id, flags=flags)
    return dns.message.make_query(
        name,
        rdtype,
        rdclass,
        use_edns=0,
        payload=draw(
            st.one_of(st.sampled_from([0, 511, 512, 513, 1232, 4096]), st.integers(0, 0xFFFF))
        ),
        want_dnssec=draw(st.booleans()),
        options=draw(edns_options),
        id=msg_id,
        flags=flags,
    )


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Real messages broken in the ways wire bugs hide: rewritten counts and flags, bytes
    overwritten, inserted or cut off. Most stay well-formed far enough to reach deep code."""
    message: dns.message.Message = draw(queries())
    if draw(st.booleans()):
        message = dns.message.make_response(message)
        message.answer.append(
            dns.rrset.from_text(message.question[0].name, 60, "IN", "A", "192.0.2.1")
        )
    data = bytearray(to_wire(message))
    if draw(st.booleans()):
        flags = draw(st.one_of(st.just(0x0100), st.integers(0, 0xFFFF)))
        counts = [draw(st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF))) for _ in range(4)]
        data[2:12] = struct.pack("!HHHHH", flags, *counts)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(data)))
        new = draw(
            st.sampled_from([0x00, 0x01, 0x29, 0x3F, 0x40, 0x80, 0xBF, 0xC0, 0xC0 | 12, 0xFF])
        )
        if draw(st.booleans()) and where < len(data):
            data[where] = new
        else:
            data.insert(where, new)
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


any_bytes = st.one_of(st.binary(max_size=400), mangled())

# --- helpers -------------------------------------------------------------------------------------


def header(
    *, msg_id: int = 0x1234, flags: int = RD, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return HEADER.pack(msg_id, flags, qd, an, ns, ar)


QUESTION = b"\x07Example\x03COM\x00" + struct.pack("!HH", 1, 1)
OPT_RR = b"\x00" + struct.pack("!HHIH", TYPE_OPT, 1232, 0, 0)
A_RR = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 1])


def name_wire(name: dns.name.Name) -> bytes:
    data = name.to_wire()
    assert data is not None  # None only when writing to a file
    return data


def question_wire(name: dns.name.Name, rdtype: int, rdclass: int) -> bytes:
    return name_wire(name) + struct.pack("!HH", rdtype, rdclass)


def to_wire(message: dns.message.Message) -> bytes:
    """dnspython's rendering, without its default cap at the EDNS payload size in the message."""
    data: bytes = message.to_wire(max_size=MAX_MESSAGE_SIZE)
    return data


def opt_wire(message: dns.message.Message) -> bytes:
    """The OPT record of ``message`` as dnspython writes it (its owner, the root, uncompressed)."""
    assert message.opt is not None
    out = io.BytesIO()
    message.opt.to_wire(out)
    return out.getvalue()


def read(wire: bytes) -> dns.message.Message:
    """dnspython's reading of a message we produced.

    An UPDATE message is read as if it were a QUERY: dnspython applies RFC 2136 §2.3 to it (the
    zone section holds one SOA question), which an error answer echoing whatever question came
    with an UPDATE we refuse (NOTIMP) need not satisfy. The opcode is checked separately.
    """
    flags = struct.unpack_from("!H", wire, 2)[0]
    if flags & OPCODE_BITS == int(dns.opcode.UPDATE) << 11:
        wire = wire[:2] + struct.pack("!H", flags & ~OPCODE_BITS) + wire[4:]
    return dns.message.from_wire(wire)


def first_question(data: bytes) -> bytes | None:
    """dnspython's reading of the single question of ``data``, if written without compression.

    RFC 1035 §4.1.4: a pointer refers to a *prior* name, and the first question's name has none.
    """
    if len(data) < 12 or HEADER.unpack_from(data)[2] != 1:
        return None
    probe = data[:2] + header(flags=0, qd=1)[2:] + data[12:]
    try:
        message = dns.message.from_wire(probe, question_only=True, ignore_trailing=True)
    except dns.exception.DNSException:
        return None
    name = name_wire(message.question[0].name)
    if not data.startswith(name, 12):
        return None
    return data[12 : 12 + len(name) + 4]


def flip_case(name: dns.name.Name, mask: Sequence[bool]) -> dns.name.Name:
    """``name`` with the ASCII letters chosen by ``mask`` in the other case (like DNS 0x20)."""
    flat = iter(mask)
    return dns.name.Name(
        [
            bytes(
                b ^ 0x20 if chr(b).isascii() and chr(b).isalpha() and next(flat, False) else b
                for b in label
            )
            for label in name.labels
        ]
    )


def drain(decoder: FrameDecoder) -> list[bytes]:
    out: list[bytes] = []
    while (message := decoder.next_message()) is not NEED_DATA:
        assert isinstance(message, bytes)
        out.append(message)
    return out


def wire_error(data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        parse_query(data)
    return info.value


# --- parse_query: well-formed queries ------------------------------------------------------------


def check_query(parsed: Query, message: dns.message.Message, data: bytes) -> None:
    """``parsed`` says what dnspython says about the query ``data``."""
    assert parsed.id == message.id
    assert parsed.flags == int(message.flags)
    (rrset,) = message.question
    assert parsed.question == question_wire(rrset.name, rrset.rdtype, rrset.rdclass)
    assert data.startswith(parsed.question, 12)  # verbatim, case and all
    assert parsed.question_key == question_wire(
        rrset.name.canonicalize(), rrset.rdtype, rrset.rdclass
    )
    if message.opt is None:
        assert parsed.opt is None
        assert parsed.udp_limit == 512
        assert not parsed.dnssec_ok
    else:
        assert parsed.opt is not None
        assert parsed.opt in data
        assert parsed.opt[:9] == opt_wire(message)[:9]  # owner, type, payload, TTL
        assert parsed.udp_limit == max(512, message.payload)
        assert parsed.dnssec_ok == bool(message.ednsflags & DO)


@SOME
@given(queries())
def test_parse_query_matches_dnspython(query: dns.message.QueryMessage) -> None:
    data = to_wire(query)
    parsed = parse_query(data)
    message = dns.message.from_wire(data)
    check_query(parsed, message, data)
    # dnspython renders the OPT record last here, so the verbatim copy is the message's tail.
    assert parsed.opt == (None if query.opt is None else data[-len(opt_wire(query)) :])
    # Only the name is folded; the type and class bytes are kept as they are.
    assert parsed.question_key[:-4] == parsed.question_key[:-4].lower()
    assert parsed.question_key[-4:] == parsed.question[-4:]


@SOME
@given(dns_names(), st.lists(st.booleans(), max_size=255), rdtypes, rdclasses)
def test_question_key_ignores_ascii_case_only(
    name: dns.name.Name,
    mask: list[bool],
    rdtype: dns.rdatatype.RdataType,
    rdclass: dns.rdataclass.RdataClass,
) -> None:
    original = parse_query(to_wire(dns.message.make_query(name, rdtype, rdclass)))
    variant = parse_query(to_wire(dns.message.make_query(flip_case(name, mask), rdtype, rdclass)))
    assert original.question_key == variant.question_key
    assert (original.question == variant.question) == (flip_case(name, mask).labels == name.labels)


def test_question_key_folds_only_ascii() -> None:
    # RFC 4343 §3: only A-Z/a-z are case-folded; 0xC4 and 0xE4 are different octets.
    upper = parse_query(to_wire(dns.message.make_query(dns.name.Name([b"\xc4X", b""]), "A")))
    lower = parse_query(to_wire(dns.message.make_query(dns.name.Name([b"\xe4x", b""]), "A")))
    assert upper.question_key == b"\x02\xc4x\x00\x00\x01\x00\x01"
    assert lower.question_key == b"\x02\xe4x\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("payload", "limit"),
    [
        (0, 512),
        (1, 512),
        (511, 512),
        (512, 512),
        (513, 513),
        (1232, 1232),
        (4096, 4096),
        (65535, 65535),
    ],
)
def test_udp_limit_with_edns(payload: int, limit: int) -> None:
    # RFC 6891 §6.2.5: payload values below 512 are treated as 512.
    query = dns.message.make_query("example.com.", "A", use_edns=0, payload=payload)
    assert parse_query(to_wire(query)).udp_limit == limit


def test_udp_limit_without_edns() -> None:
    assert parse_query(to_wire(dns.message.make_query("example.com.", "A"))).udp_limit == 512


def test_name_of_exactly_255_bytes_is_accepted() -> None:
    name = dns.name.Name([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61, b""])
    assert len(name_wire(name)) == 255
    parsed = parse_query(to_wire(dns.message.make_query(name, "A")))
    assert parsed.question == name_wire(name) + b"\x00\x01\x00\x01"


def test_root_query() -> None:
    parsed = parse_query(to_wire(dns.message.make_query(".", "NS")))
    assert parsed.question == parsed.question_key == b"\x00\x00\x02\x00\x01"


@FEW
@given(queries(), st.booleans())
def test_other_records_are_skipped(query: dns.message.QueryMessage, answers: bool) -> None:
    """Records in the answer, authority and additional sections (compressed against the
    question) and a TSIG after the OPT record do not hide the OPT record."""
    name = query.question[0].name
    query.authority.append(dns.rrset.from_text(name, 60, "IN", "NS", "ns.example."))
    query.additional.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.7", "192.0.2.8"))
    if answers:
        query.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", '"x"'))
    keyring = dns.tsigkeyring.from_text({"key.example.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    query.use_tsig(keyring, keyname="key.example.")
    data = to_wire(query)
    message = dns.message.from_wire(data, keyring=keyring)
    assert HEADER.unpack_from(data)[5] == 2 + 1 + (query.opt is not None)  # A, A, TSIG, OPT
    check_query(parse_query(data), message, data)


# --- parse_query: what it refuses ----------------------------------------------------------------


@pytest.mark.parametrize("size", range(12))
def test_shorter_than_a_header_is_dropped(size: int) -> None:
    assert wire_error((header() + QUESTION)[:size]).rcode is None


def test_response_is_dropped() -> None:
    # No answer to a response, of any rcode or opcode: no reflection, no ping-pong.
    assert wire_error(header(flags=QR | RD) + QUESTION).rcode is None
    assert wire_error(header(flags=QR | (4 << 11)) + QUESTION).rcode is None
    assert wire_error(header(flags=QR | 2) + QUESTION).rcode is None


@pytest.mark.parametrize("rcode", range(1, 16))
def test_error_response_is_dropped(rcode: int) -> None:
    # Answering an error with an error invites two servers to bounce them forever.
    assert wire_error(header(flags=QR | rcode) + QUESTION).rcode is None


@pytest.mark.parametrize("opcode", range(1, 16))
def test_opcode_other_than_query_is_notimp(opcode: int) -> None:
    assert wire_error(header(flags=opcode << 11 | RD) + QUESTION).rcode == Rcode.NOTIMP
    # Checked before the question count: NOTIMP is the better answer to an opcode we don't do.
    assert wire_error(header(flags=opcode << 11, qd=0)).rcode == Rcode.NOTIMP


@pytest.mark.parametrize("qdcount", [0, 2, 3, 0xFFFF])
def test_question_count_other_than_one_is_formerr(qdcount: int) -> None:
    data = header(qd=qdcount) + QUESTION * min(qdcount, 3)
    assert wire_error(data).rcode == Rcode.FORMERR


@pytest.mark.parametrize("edns", [False, True])
def test_every_truncation_is_formerr(edns: bool) -> None:
    cookie = dns.edns.CookieOption(b"c" * 8, b"")
    if edns:
        query = dns.message.make_query("www.Example.com.", "AAAA", use_edns=0, options=[cookie])
    else:
        query = dns.message.make_query("www.Example.com.", "AAAA", use_edns=False)
    data = to_wire(query)
    parse_query(data)
    for size in range(12, len(data)):
        assert wire_error(data[:size]).rcode == Rcode.FORMERR, size


@pytest.mark.parametrize("label_type", [0x40, 0x41, 0x7F, 0x80, 0xBF])
def test_reserved_label_types_are_formerr(label_type: int) -> None:
    # RFC 6891 §5: 0b01 and 0b10 label types are reserved (extended labels are deprecated).
    data = header() + bytes([label_type]) + b"a" * 200 + b"\x00\x00\x01\x00\x01"
    assert wire_error(data).rcode == Rcode.FORMERR


@pytest.mark.parametrize("name", [b"\xc0\x0c", b"\xc0\x00", b"\x03abc\xc0\x0c", b"\xff\xff"])
def test_compressed_first_question_is_formerr(name: bytes) -> None:
    # RFC 1035 §4.1.4: a pointer refers to a prior occurrence, and nothing precedes this name.
    data = header() + name + b"\x00\x01\x00\x01" + b"\x00" * 40
    assert wire_error(data).rcode == Rcode.FORMERR


def test_name_longer_than_255_bytes_is_formerr() -> None:
    name = (
        b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"b" * 63
        + b"\x3f"
        + b"c" * 63
        + b"\x3e"
        + b"d" * 62
        + b"\x00"
    )
    assert len(name) == 256
    assert wire_error(header() + name + b"\x00\x01\x00\x01").rcode == Rcode.FORMERR
    endless = header() + b"\x01a" * 200 + b"\x00\x00\x01\x00\x01"
    assert wire_error(endless).rcode == Rcode.FORMERR


def test_two_opt_records_are_formerr() -> None:
    # RFC 6891 §6.1.1: more than one OPT record → FORMERR.
    assert wire_error(header(ar=2) + QUESTION + OPT_RR + OPT_RR).rcode == Rcode.FORMERR
    assert wire_error(header(ar=3) + QUESTION + OPT_RR + A_RR + OPT_RR).rcode == Rcode.FORMERR


@pytest.mark.parametrize("owner", [b"\x01a\x00", b"\xc0\x0c", b"\xc0\x18"])
def test_opt_not_owned_by_root_is_formerr(owner: bytes) -> None:
    # RFC 6891 §6.1.2: OPT's owner MUST be 0 (root). A pointer is not the zero byte.
    data = header(ar=1) + QUESTION + owner + OPT_RR[1:]
    assert wire_error(data).rcode == Rcode.FORMERR


@pytest.mark.parametrize(
    "data",
    [
        header(ar=2) + QUESTION + OPT_RR,  # a record missing
        header(ar=1) + QUESTION + OPT_RR[:-1] + b"\x05" + b"\x00" * 4,  # rdata cut short
        header(ar=1) + QUESTION + OPT_RR[:-2],  # fixed part cut short
        header(an=1) + QUESTION,  # answer section missing
        header(ns=1, ar=1) + QUESTION + OPT_RR,  # the OPT is read as the authority record
        header(ar=1) + QUESTION + b"\x40" + OPT_RR[1:],  # bad label in an owner
    ],
)
def test_broken_records_are_formerr(data: bytes) -> None:
    assert wire_error(data).rcode == Rcode.FORMERR


def test_opt_in_authority_is_not_the_clients_opt() -> None:
    parsed = parse_query(header(ns=1) + QUESTION + OPT_RR)
    assert parsed.opt is None
    assert parsed.udp_limit == 512


# --- parse_query and error_reply on any bytes at all ---------------------------------------------


@MANY
@given(any_bytes)
def test_parse_query_never_raises_anything_but_wire_error(data: bytes) -> None:
    try:
        parsed = parse_query(data)
    except WireError as exc:
        assert exc.rcode in (None, Rcode.FORMERR, Rcode.NOTIMP)
        if exc.rcode is None:
            assert len(data) < 12 or HEADER.unpack_from(data)[1] & QR
        outcome: Query | WireError = exc
    else:
        # Whatever it accepts, its own answers and matching work on.
        assert data.startswith(parsed.question, 12)
        responded = data[:2] + struct.pack("!H", parsed.flags | QR) + data[4:]
        assert answer_question_key(responded) == parsed.question_key
        reply = error_reply(parsed, Rcode.SERVFAIL)
        assert reply is not None
        assert len(dns.message.from_wire(reply).question) == 1
        assert reply.startswith(parsed.question, 12)
        outcome = parsed
    agrees_with_dnspython(data, outcome)


def agrees_with_dnspython(data: bytes, outcome: Query | WireError) -> None:
    """A plain query that dnspython accepts, parse_query accepts too and reads the same way.

    (The other way round does not hold on purpose: a forwarder does not read record data, so
    trailing bytes or a garbled record body are the upstream's to reject.)
    """
    try:
        message = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return
    if message.flags & QR or message.opcode() != 0 or len(message.question) != 1:
        return
    if first_question(data) is None:
        return  # a compressed first name, which we refuse (RFC 1035 §4.1.4)
    if isinstance(outcome, WireError):
        # A pointer to a zero byte makes a root owner to dnspython; RFC 6891 says the owner is 0.
        assert message.opt is not None, outcome
        assert "OPT record not owned by the root" in str(outcome)
        return
    check_query(outcome, message, data)


@MANY
@given(any_bytes, st.sampled_from(list(Rcode)))
def test_error_reply_to_any_bytes(data: bytes, rcode: Rcode) -> None:
    reply = error_reply(data, rcode)
    if len(data) < 12:
        assert reply is None
        return
    assert reply is not None
    msg_id, flags = HEADER.unpack_from(data)[:2]
    message = read(reply)
    assert message.id == msg_id
    assert int(message.rcode()) == rcode
    assert message.flags & QR
    assert message.flags & RA
    assert message.flags & (RD | CD) == flags & (RD | CD)
    # RFC 1035 §4.1.1: the opcode is copied (read from the bytes: read() masks UPDATE).
    assert HEADER.unpack_from(reply)[1] & OPCODE_BITS == flags & OPCODE_BITS
    assert not (message.answer or message.authority or message.additional)
    assert message.edns == -1  # no OPT echo without a parsed query
    question = first_question(data)
    if question is None:
        assert message.question == []
        assert len(reply) == 12
    else:
        assert reply[12:] == question
    assert len(reply) <= 512


# --- error_reply to a parsed query ---------------------------------------------------------------


@SOME
@given(queries(), st.sampled_from(list(Rcode)))
def test_error_reply_to_query(query: dns.message.QueryMessage, rcode: Rcode) -> None:
    parsed = parse_query(to_wire(query))
    reply = error_reply(parsed, rcode)
    assert reply is not None
    assert len(reply) <= 512  # fits any UDP client
    message = dns.message.from_wire(reply)
    assert message.id == query.id
    assert int(message.rcode()) == rcode
    assert message.opcode() == dns.opcode.QUERY
    assert int(message.flags) & ~RCODE_BITS == QR | RA | (int(query.flags) & (RD | CD))
    assert message.question == query.question
    assert [r.name.labels for r in message.question] == [r.name.labels for r in query.question]
    assert not (message.answer or message.authority or message.additional)
    if query.opt is None:
        assert message.edns == -1
    else:
        # RFC 6891 §7: answer EDNS with EDNS, advertising our own payload size.
        assert message.edns == 0
        assert message.payload == 1232
        assert message.ednsflags == (query.ednsflags & DO)
        assert message.options == ()
    assert query.is_response(message)


# --- answer_question_key -------------------------------------------------------------------------


@SOME
@given(queries(), st.lists(st.booleans(), max_size=255), st.integers(0, 20))
def test_answer_key_matches_query_key(
    query: dns.message.QueryMessage, mask: list[bool], records: int
) -> None:
    key = parse_query(to_wire(query)).question_key
    (rrset,) = query.question
    # The upstream may answer in another case (DNS 0x20) and with any number of records.
    echoed = dns.message.make_query(flip_case(rrset.name, mask), rrset.rdtype, rrset.rdclass)
    response = dns.message.make_response(echoed)
    for i in range(records):
        response.answer.append(dns.rrset.from_text(rrset.name, 60, "IN", "A", f"192.0.2.{i}"))
    assert answer_question_key(to_wire(response)) == key


def test_answer_key_none_for_unusable_answers() -> None:
    query = dns.message.make_query("example.com.", "A")
    response = dns.message.make_response(query)
    assert answer_question_key(to_wire(query)) is None  # QR clear: not an answer
    no_question = dns.message.make_response(query)
    no_question.question = []
    assert answer_question_key(to_wire(no_question)) is None
    wire = to_wire(response)
    assert answer_question_key(wire) is not None
    two = header(flags=QR, qd=2) + QUESTION + QUESTION
    assert answer_question_key(two) is None
    for size in range(len(wire) - 4):  # short or with its question cut
        assert answer_question_key(wire[:size]) is None
    assert answer_question_key(header(flags=QR) + b"\xc0\x0c\x00\x01\x00\x01") is None
    assert answer_question_key(header(flags=QR) + b"\x40" + b"a" * 70) is None


@MANY
@given(any_bytes)
def test_answer_key_of_any_bytes(data: bytes) -> None:
    key = answer_question_key(data)
    if key is not None:
        assert HEADER.unpack_from(data)[1] & QR
        question = first_question(data)
        assert question is not None
        assert key == question[:-4].lower() + question[-4:]


# --- truncate_for_udp ----------------------------------------------------------------------------


@st.composite
def responses(draw: st.DrawFn) -> dns.message.Message:
    """A response as an upstream sends it: any question; many A and TXT answers, NS records in
    authority, glue in additional; with no OPT, a plain one, or one with cookie and padding."""
    query = draw(queries())
    response = dns.message.make_response(query)
    name = query.question[0].name
    ttl = draw(st.integers(0, 86400))
    count = draw(st.integers(0, 120))
    if count:
        addresses = [f"192.0.{i // 256}.{i % 256}" for i in range(count)]
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", *addresses))
    texts = draw(st.lists(st.binary(max_size=255), max_size=20))
    if texts:
        txt = [dns.rdtypes.ANY.TXT.TXT(IN, TXT, [t, bytes([i])]) for i, t in enumerate(texts)]
        response.answer.append(dns.rrset.from_rdata_list(name, ttl, txt))
    glue = draw(st.integers(0, 8))
    if glue:
        servers = [f"ns{i}.example." for i in range(glue)]
        response.authority.append(dns.rrset.from_text("example.", ttl, "IN", "NS", *servers))
        for server in servers:
            response.additional.append(dns.rrset.from_text(server, ttl, "IN", "A", "192.0.2.53"))
    edns = draw(st.sampled_from(["none", "plain", "options"]))
    if edns == "none":
        response.use_edns(False)
    else:
        options = draw(edns_options) if edns == "options" else []
        response.use_edns(
            0,
            ednsflags=draw(st.sampled_from([0, DO])),
            payload=draw(st.integers(0, 0xFFFF)),
            options=options,
        )
    rcode = draw(st.sampled_from([0, 2, 3, 16 if edns != "none" else 5]))
    response.set_rcode(dns.rcode.Rcode.make(rcode))
    return response


def check_truncated(out: bytes, wire: bytes, limit: int) -> None:
    original = dns.message.from_wire(wire)
    message = dns.message.from_wire(out)
    assert len(out) <= limit
    assert message.id == original.id
    assert int(message.flags) == int(original.flags) | TC
    assert message.rcode() == original.rcode()
    (question,) = original.question
    question_bytes = question_wire(question.name, question.rdtype, question.rdclass)
    assert out.startswith(question_bytes, 12)
    assert not (message.answer or message.authority or message.additional)
    _, _, qd, an, ns, ar = HEADER.unpack_from(out)
    assert (qd, an, ns) == (1, 0, 0)
    if original.opt is None:
        assert ar == 0
        assert message.edns == -1
        return
    # RFC 6891 §7: the truncated answer still carries OPT, options dropped only if they don't fit.
    assert ar == 1
    assert (message.edns, message.payload, message.ednsflags) == (
        original.edns,
        original.payload,
        original.ednsflags,
    )
    fits = 12 + len(question_bytes) + len(opt_wire(original)) <= limit
    assert message.options == (original.options if fits else ())


@SOME
@given(responses(), st.integers(512, 4096))
def test_truncate_for_udp(response: dns.message.Message, limit: int) -> None:
    wire = to_wire(response)
    out = truncate_for_udp(wire, limit)
    if len(wire) <= limit:
        assert out is wire
    else:
        check_truncated(out, wire, limit)


@pytest.mark.parametrize("records", [40, 200])
@pytest.mark.parametrize("edns", [False, True])
def test_truncate_at_the_exact_limit(records: int, edns: bool) -> None:
    query = dns.message.make_query("Big.Example.", "A", use_edns=0 if edns else False)
    response = dns.message.make_response(query)
    addresses = [f"192.0.2.{i}" for i in range(records)]
    response.answer.append(dns.rrset.from_text("big.example.", 60, "IN", "A", *addresses))
    wire = to_wire(response)
    assert truncate_for_udp(wire, len(wire)) is wire
    check_truncated(truncate_for_udp(wire, len(wire) - 1), wire, len(wire) - 1)


def test_truncate_drops_opt_options_that_do_not_fit() -> None:
    # A DoT upstream pads its answers (RFC 8467); the padding must not push a TC answer past 512.
    query = dns.message.make_query("example.com.", "TXT", use_edns=0, want_dnssec=True)
    response = dns.message.make_response(query)
    padding = dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * 600)
    response.use_edns(0, ednsflags=DO, payload=1232, options=[padding])
    response.set_rcode(dns.rcode.BADVERS)
    wire = to_wire(response)
    out = truncate_for_udp(wire, 512)
    check_truncated(out, wire, 512)
    message = dns.message.from_wire(out)
    assert message.options == ()
    assert message.rcode() == dns.rcode.BADVERS  # extended RCODE kept from the OPT TTL
    assert message.ednsflags & DO


def test_truncate_answer_with_several_long_questions() -> None:
    # Three 255-byte names: the questions alone are past 512 bytes, so they cannot be kept.
    names = [dns.name.Name([bytes([c]) * 63] * 3 + [bytes([c]) * 61, b""]) for c in b"xyz"]
    query = dns.message.make_query(names[0], "A", use_edns=0, payload=512)
    for name in names[1:]:
        query.question.append(dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.A))
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(names[0], 60, "IN", "A", "192.0.2.1"))
    wire = to_wire(response)
    assert HEADER.unpack_from(wire)[2] == 3
    out = truncate_for_udp(wire, 512)
    assert len(out) <= 512
    message = dns.message.from_wire(out)
    assert message.id == response.id
    assert message.flags & TC
    assert not (message.answer or message.authority or message.additional)
    assert message.edns == 0  # RFC 6891 §7: OPT kept even when the questions must go


def test_truncate_unwalkable_answer_keeps_only_the_header() -> None:
    answer = header(msg_id=7, flags=QR | RD | RA, an=3, ar=1) + QUESTION + b"\x40" * 600
    out = truncate_for_udp(answer, 512)
    assert out == header(msg_id=7, flags=QR | RD | RA | TC, qd=0)
    dns.message.from_wire(out)


@MANY
@given(any_bytes.filter(lambda data: len(data) >= 12), st.integers(512, 1024))
def test_truncate_any_bytes(data: bytes, limit: int) -> None:
    # Pad past the limit with junk so the slow path runs on every example.
    data += b"\x00" * (limit + 1 - len(data)) if len(data) <= limit else b""
    out = truncate_for_udp(data, limit)
    assert len(out) <= limit
    assert out[:2] == data[:2]
    assert HEADER.unpack_from(out)[1] == HEADER.unpack_from(data)[1] | TC
    assert HEADER.unpack_from(out)[3:5] == (0, 0)


# --- IDs -----------------------------------------------------------------------------------------


@SOME
@given(st.binary(min_size=2, max_size=100), st.integers(0, 0xFFFF))
def test_replace_id_round_trip(message: bytes, new_id: int) -> None:
    replaced = replace_id(message, new_id)
    assert message_id(replaced) == new_id
    assert replaced[2:] == message[2:]
    assert replace_id(replaced, message_id(message)) == message


@FEW
@given(queries(), st.integers(0, 0xFFFF))
def test_replace_id_agrees_with_dnspython(query: dns.message.QueryMessage, new_id: int) -> None:
    wire = to_wire(query)
    assert message_id(wire) == query.id
    assert dns.message.from_wire(replace_id(wire, new_id)).id == new_id


# --- framing -------------------------------------------------------------------------------------

BIGGEST = bytes(range(256)) * 255 + bytes(range(255))
assert len(BIGGEST) == MAX_MESSAGE_SIZE

messages = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=200, max_size=700),
    st.sampled_from([b"", b"\x00", BIGGEST, BIGGEST[:-1], BIGGEST[:256]]),
)


def test_frame() -> None:
    assert frame(b"") == b"\x00\x00"
    assert frame(b"abc") == b"\x00\x03abc"
    assert frame(BIGGEST)[:2] == b"\xff\xff"
    with pytest.raises(WireError) as info:
        frame(BIGGEST + b"x")
    assert info.value.rcode is None


def check_stream(messages: list[bytes], chunks: list[bytes], decoder: FrameDecoder) -> None:
    """Feed ``chunks`` one at a time, draining after each, against a model of where frames end."""
    ends: list[int] = []
    for message in messages:
        ends.append((ends[-1] if ends else 0) + 2 + len(message))
    received: list[bytes] = []
    fed = 0
    for chunk in chunks:
        decoder.feed(chunk)
        fed += len(chunk)
        new = drain(decoder)
        assert new == messages[len(received) : len(received) + len(new)]
        received += new
        done = sum(1 for end in ends if end <= fed)
        assert len(received) == done
        assert decoder.buffered == fed - (ends[done - 1] if done else 0)
        assert decoder.in_frame == (decoder.buffered > 0)
        assert decoder.next_message() is NEED_DATA
    assert received == messages
    assert decoder.buffered == 0
    assert not decoder.in_frame


@SOME
@given(st.lists(messages, max_size=6), st.data())
def test_decoder_random_splits(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(message) for message in messages)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=40)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    check_stream(messages, chunks, FrameDecoder(max_buffer=max(65537, len(stream))))


@SOME
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_decoder_byte_by_byte_small(messages: list[bytes]) -> None:
    stream = b"".join(frame(message) for message in messages)
    check_stream(messages, [stream[i : i + 1] for i in range(len(stream))], FrameDecoder())


def test_decoder_byte_by_byte_large() -> None:
    messages = [b"", BIGGEST, b"x", BIGGEST[:-1], b""]
    stream = b"".join(frame(message) for message in messages)
    check_stream(messages, [stream[i : i + 1] for i in range(len(stream))], FrameDecoder())


@SOME
@given(st.lists(messages, max_size=6))
def test_decoder_all_at_once(messages: list[bytes]) -> None:
    stream = b"".join(frame(message) for message in messages)
    decoder = FrameDecoder(max_buffer=max(65537, len(stream)))
    decoder.feed(stream)
    assert decoder.buffered == len(stream)
    assert drain(decoder) == messages
    assert decoder.next_message() is NEED_DATA
    assert decoder.buffered == 0
    assert not decoder.in_frame


def test_decoder_partial_frame_state() -> None:
    decoder = FrameDecoder()
    assert decoder.next_message() is NEED_DATA
    assert (decoder.buffered, decoder.in_frame) == (0, False)
    decoder.feed(b"\x00")  # half a length prefix
    assert decoder.next_message() is NEED_DATA
    assert (decoder.buffered, decoder.in_frame) == (1, True)
    decoder.feed(b"\x03ab")
    assert decoder.next_message() is NEED_DATA
    assert (decoder.buffered, decoder.in_frame) == (4, True)
    decoder.feed(b"c\x00")
    assert decoder.next_message() == b"abc"
    assert (decoder.buffered, decoder.in_frame) == (1, True)
    assert decoder.next_message() is NEED_DATA


def test_decoder_copies_what_it_is_fed() -> None:
    decoder = FrameDecoder()
    chunk = bytearray(b"\x00\x02hi")
    decoder.feed(chunk)
    chunk[2:] = b"XX"
    assert decoder.next_message() == b"hi"


def test_decoder_caps_its_buffer() -> None:
    decoder = FrameDecoder(max_buffer=65537)
    decoder.feed(b"\xff\xff" + b"a" * 65534)
    decoder.feed(b"b")  # exactly max_buffer waiting
    with pytest.raises(WireError) as info:
        decoder.feed(b"\x00")
    assert info.value.rcode is None
    assert decoder.buffered == 65537  # the refused bytes were not taken
    assert decoder.next_message() == b"a" * 65534 + b"b"
    decoder.feed(b"\x00\x00" * 1000)  # drained messages free their room
    assert drain(decoder) == [b""] * 1000


def test_decoder_default_cap() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00" * (4 * 65537))
    with pytest.raises(WireError):
        decoder.feed(b"\x00")
    undrained = FrameDecoder()
    with pytest.raises(WireError):
        undrained.feed(b"\x00" * (4 * 65537 + 1))


@pytest.mark.parametrize("max_buffer", [-1, 0, 2, 65535, 65536])
def test_decoder_must_hold_one_whole_message(max_buffer: int) -> None:
    with pytest.raises(ValueError, match="max_buffer"):
        FrameDecoder(max_buffer=max_buffer)


# --- answer_matches and frame_with_id (hot-path forms of the functions above) -------------------


@MANY
@given(
    name=st.sampled_from(["example.com.", "ExAmPlE.CoM.", "a.b.c.test.", ".", "x.y."]),
    header=st.binary(min_size=12, max_size=12),
    tail=st.binary(max_size=40),
    cut=st.integers(0, 60),
)
def test_answer_matches_agrees_with_answer_question_key(
    name: str, header: bytes, tail: bytes, cut: int
) -> None:
    # Keys as parse_query makes them; answers that repeat the question exactly or nearly.
    key = parse_query(dns.message.make_query(name, "A").to_wire()).question_key
    for answer in (header + key + tail, (header + key + tail)[:cut], header + tail):
        assert answer_matches(answer, key) == (answer_question_key(answer) == key)


@FEW
@given(name=st.sampled_from(["example.com.", "ExAmPlE.CoM.", "a.b.c.test.", "."]))
def test_answer_matches_real_answers_whatever_the_case(name: str) -> None:
    request = dns.message.make_query(name, "A")
    wire = request.to_wire()
    key = parse_query(wire).question_key
    response = dns.message.make_response(request).to_wire()
    assert answer_matches(response, key)
    other = dns.message.make_response(dns.message.make_query("other.test.", "A")).to_wire()
    assert not answer_matches(other, key)
    assert not answer_matches(wire, key)  # a query (QR clear) is no answer


@SOME
@given(message=st.binary(min_size=2, max_size=300), new_id=st.integers(0, 0xFFFF))
def test_frame_with_id_is_frame_of_replace_id(message: bytes, new_id: int) -> None:
    assert frame_with_id(message, new_id) == frame(replace_id(message, new_id))
