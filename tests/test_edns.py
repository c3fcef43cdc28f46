"""Pure tests of :mod:`dot_proxy.core.edns`: dnspython builds the messages and judges the results.

A padded query must be, to dnspython, the same query plus one Padding option of zeros and
nothing else; a stripped answer the same answer minus its Padding option (or minus its whole OPT
record). Hypothesis covers names, option mixes, sizes and blocks; hand-built messages cover what
dnspython will not write (OPT before other additional records, overrunning options, SIG(0)).
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dot_proxy.core.edns import (
    OPTION_PADDING,
    QUERY_BLOCK,
    message_layout,
    pad_query,
    strip_padding,
)
from dot_proxy.core.message import (
    Rcode,
    answer_question_key,
    name_end,
    parse_query,
)
from dot_proxy.core.message import question_end as _question_end
from dot_proxy.errors import WireError

SOME = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")
TYPE_OPT = 41
DO = int(dns.flags.DO)
KEYRING = dns.tsigkeyring.from_text({"key.example.": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"})
KEYNAME = dns.name.from_text("key.example.")


def to_wire(message: dns.message.Message) -> bytes:
    """dnspython's wire form, not capped at the message's own EDNS payload size."""
    return message.to_wire(max_size=65535)


def parse(wire: bytes) -> dns.message.Message:
    """Parse as a client would, reading TSIG records without checking their MACs."""
    return dns.message.from_wire(wire, keyring=lambda _message, _name: False)


# --- strategies ------------------------------------------------------------------------------

_HOSTNAME = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
labels = st.one_of(
    st.text(alphabet=_HOSTNAME, min_size=1, max_size=63).map(str.encode),
    st.binary(min_size=1, max_size=20),
)
names = st.lists(labels, max_size=4).map(lambda ls: dns.name.Name([*ls, b""]))
rdtypes = st.sampled_from(["A", "AAAA", "MX", "TXT", "HTTPS", "SOA", "ANY", "TYPE65280"])


def padding(size: int, fill: bytes = b"\x00") -> dns.edns.Option:
    return dns.edns.GenericOption(dns.edns.OptionType.PADDING, fill * size)


other_options: st.SearchStrategy[dns.edns.Option] = st.one_of(
    st.builds(
        dns.edns.CookieOption,
        st.binary(min_size=8, max_size=8),
        st.one_of(st.just(b""), st.binary(min_size=8, max_size=32)),
    ),
    st.builds(dns.edns.NSIDOption, st.binary(max_size=20)),
    st.builds(
        dns.edns.EDEOption,
        st.sampled_from(list(dns.edns.EDECode)),
        st.one_of(st.none(), st.text(alphabet=_HOSTNAME, min_size=1, max_size=30)),
    ),
    st.builds(
        dns.edns.ECSOption,
        st.sampled_from(["192.0.2.0", "2001:db8::"]),
        st.integers(0, 24),
    ),
    st.builds(dns.edns.GenericOption, st.integers(0xFDE9, 0xFFFE), st.binary(max_size=40)),
)
# Clients may send a Padding option of their own (kdig +padding), even one with odd bytes.
any_options = st.lists(
    st.one_of(
        other_options,
        st.builds(padding, st.integers(0, 300)),
        st.builds(padding, st.integers(1, 10), st.just(b"\xff")),
    ),
    max_size=4,
)


@st.composite
def queries(
    draw: st.DrawFn, *, options: st.SearchStrategy[list[dns.edns.Option]] = any_options
) -> dns.message.QueryMessage:
    name, rdtype = draw(names), draw(rdtypes)
    msg_id = draw(st.integers(0, 0xFFFF))
    flags = draw(st.sets(st.sampled_from([dns.flags.RD, dns.flags.CD, dns.flags.AD])))
    flag_bits = sum(int(flag) for flag in flags)
    if not draw(st.booleans()):
        return dns.message.make_query(name, rdtype, use_edns=False, id=msg_id, flags=flag_bits)
    return dns.message.make_query(
        name,
        rdtype,
        use_edns=0,
        payload=draw(st.sampled_from([512, 1232, 4096, 65535])),
        want_dnssec=draw(st.booleans()),
        options=draw(options),
        id=msg_id,
        flags=flag_bits,
    )


@st.composite
def answers(draw: st.DrawFn) -> tuple[dns.message.Message, bytes]:
    """A response as an upstream writes it: records in every section, EDNS with or without
    padding (dnspython's own ``pad=`` or an explicit option), sometimes TSIG-signed."""
    query = dns.message.make_query(draw(names), "A", use_edns=False)
    response = dns.message.make_response(query)
    owner = query.question[0].name
    for i in range(draw(st.integers(0, 6))):
        response.answer.append(dns.rrset.from_text(owner, 60, "IN", "A", f"192.0.2.{i}"))
    if draw(st.booleans()):
        response.authority.append(dns.rrset.from_text("example.", 60, "IN", "NS", "ns.example."))
    if draw(st.booleans()):
        response.additional.append(dns.rrset.from_text("ns.example.", 60, "IN", "A", "192.0.2.53"))
    response.set_rcode(draw(st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN])))
    if draw(st.integers(0, 4)):
        options: list[dns.edns.Option] = draw(st.lists(other_options, max_size=3))
        explicit = draw(st.sampled_from([None, 0, 5, 300]))
        if explicit is not None:
            options.insert(draw(st.integers(0, len(options))), padding(explicit))
        response.use_edns(
            0,
            ednsflags=draw(st.sampled_from([0, DO])),
            payload=draw(st.sampled_from([512, 1232, 4096])),
            options=options,
            pad=draw(st.sampled_from([0, 0, 128, 468])) if explicit is None else 0,
        )
    if draw(st.integers(0, 3)) == 0:
        response.use_tsig(KEYRING, KEYNAME)
    return response, to_wire(response)


@st.composite
def mangled(draw: st.DrawFn, messages: st.SearchStrategy[bytes]) -> bytes:
    """Real messages with a few bytes overwritten (counts, lengths, option codes) and cut short:
    well-formed far enough to reach the OPT record and its options."""
    data = bytearray(draw(messages))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(data) - 1))
        data[where] = draw(st.sampled_from([0x00, 0x01, 0x0C, 0x29, 0x80, 0xC0, 0xFF]))
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


# --- helpers ---------------------------------------------------------------------------------


def padding_options(message: dns.message.Message) -> list[bytes]:
    return [option.to_wire() for option in message.options if option.otype == OPTION_PADDING]


def kept_options(message: dns.message.Message) -> list[tuple[int, bytes]]:
    return [
        (int(option.otype), option.to_wire())
        for option in message.options
        if option.otype != OPTION_PADDING
    ]


def assert_same_except_opt(got: dns.message.Message, expected: dns.message.Message) -> None:
    """Equal header, rcode and sections (dnspython's ``==`` leaves out OPT and TSIG)."""
    assert got == expected
    assert got.rcode() == expected.rcode()
    assert str(got.tsig) == str(expected.tsig)


def assert_same_edns(got: dns.message.Message, expected: dns.message.Message) -> None:
    assert (got.edns, got.ednsflags, got.payload) == (
        expected.edns,
        expected.ednsflags,
        expected.payload,
    )
    assert kept_options(got) == kept_options(expected)


def opt_rr(options: bytes = b"", *, payload: int = 1232, owner: bytes = b"\x00") -> bytes:
    return owner + RR_FIXED.pack(TYPE_OPT, payload, 0, len(options)) + options


def option(code: int, data: bytes) -> bytes:
    return struct.pack("!HH", code, len(data)) + data


QUESTION = b"\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
A_RR = b"\xc0\x0c" + RR_FIXED.pack(1, 1, 300, 4) + bytes([192, 0, 2, 1])
SIG0_RR = b"\x00" + RR_FIXED.pack(24, 255, 0, 3) + b"sig"
COOKIE = option(10, b"12345678")


def message(*, flags: int = 0x0100, an: bytes = b"", ar: list[bytes] | None = None) -> bytes:
    additional = ar or []
    head = HEADER.pack(0x1234, flags, 1, 1 if an else 0, 0, len(additional))
    return head + QUESTION + an + b"".join(additional)


# --- pad_query: properties -------------------------------------------------------------------


@SOME
@given(queries())
def test_padded_query_is_the_same_query_plus_zero_padding(query: dns.message.Message) -> None:
    wire = to_wire(query)
    padded, added = pad_query(wire)
    assert len(padded) % QUERY_BLOCK == 0
    assert added == (query.edns < 0)
    got = dns.message.from_wire(padded)
    assert got == query
    [pad] = padding_options(got)
    assert pad == bytes(len(pad))
    assert len(pad) < QUERY_BLOCK  # the smallest padding that reaches the block
    if added:
        assert (got.edns, got.ednsflags, got.payload, kept_options(got)) == (0, 0, 1232, [])
        assert HEADER.unpack_from(padded)[5] == 1
    else:
        assert_same_edns(got, query)
        assert bool(got.ednsflags & DO) == bool(query.ednsflags & DO)
        assert got.options[-1].otype == OPTION_PADDING  # ours goes last, the rest keep order


@SOME
@given(queries(), st.one_of(st.integers(1, 600), st.sampled_from([1, 2, 128, 468, 512])))
def test_any_block_is_reached_with_less_than_a_block_of_padding(
    query: dns.message.Message, block: int
) -> None:
    padded, _ = pad_query(to_wire(query), block=block)
    assert len(padded) % block == 0
    [pad] = padding_options(dns.message.from_wire(padded))
    assert len(pad) < block


@SOME
@given(queries(options=st.lists(other_options, max_size=3)))
def test_stripping_a_padded_query_gives_back_the_original_bytes(
    query: dns.message.Message,
) -> None:
    wire = to_wire(query)
    padded, added = pad_query(wire)
    assert strip_padding(padded, remove_opt=added) == wire


@SOME
@given(queries())
def test_padding_is_idempotent(query: dns.message.Message) -> None:
    once, _ = pad_query(to_wire(query))
    twice, added = pad_query(once)
    assert twice == once
    assert not added


# --- pad_query: examples ---------------------------------------------------------------------


def test_query_without_opt_gets_one() -> None:
    wire = message()
    padded, added = pad_query(wire)
    assert added
    assert len(padded) == 128
    assert padded[:10] == wire[:10]
    assert HEADER.unpack_from(padded)[5] == 1
    pad_length = 128 - len(wire) - 11 - 4
    assert padded[len(wire) :] == opt_rr(option(OPTION_PADDING, bytes(pad_length)))


def test_query_already_at_the_block_gets_an_empty_padding_option() -> None:
    wire = message(ar=[opt_rr(COOKIE)])
    padded, added = pad_query(wire, block=len(wire) + 4)
    assert not added
    assert padded == message(ar=[opt_rr(COOKIE + option(OPTION_PADDING, b""))])
    assert padding_options(dns.message.from_wire(padded)) == [b""]


def test_client_padding_is_replaced_and_moves_last() -> None:
    wire = message(ar=[opt_rr(option(OPTION_PADDING, b"\xff" * 7) + COOKIE)])
    padded, _ = pad_query(wire)
    got = dns.message.from_wire(padded)
    assert [o.otype for o in got.options] == [10, OPTION_PADDING]
    assert padding_options(got)[0] == bytes(128 - (len(wire) - 7))


def test_opt_before_other_additional_records_is_padded_in_place() -> None:
    wire = message(ar=[opt_rr(COOKIE), A_RR])
    padded, added = pad_query(wire)
    assert not added
    assert len(padded) == 128
    assert padded.endswith(A_RR)
    got = dns.message.from_wire(padded)
    assert len(got.additional) == 1
    assert got.additional[0].rdtype == dns.rdatatype.A
    assert kept_options(got) == [(10, b"12345678")]


def test_trailing_bytes_after_the_records_are_dropped() -> None:
    padded, _ = pad_query(message(ar=[opt_rr()]) + b"junk")
    assert len(padded) == 128
    dns.message.from_wire(padded)  # no TrailingJunk


def test_tsig_signed_query_is_left_alone() -> None:
    query = dns.message.make_query("example.com", "A", use_edns=0)
    query.use_tsig(KEYRING, KEYNAME)
    wire = to_wire(query)
    result = pad_query(wire)
    assert result[0] is wire
    assert result[1] is False


def test_sig0_signed_query_is_left_alone() -> None:
    wire = message(ar=[opt_rr(), SIG0_RR])
    assert pad_query(wire)[0] is wire


def test_query_that_cannot_be_padded_within_65535_bytes_is_left_alone() -> None:
    # The largest multiple of 128 below 65536 is 65408; a query needing more stays as it is.
    def query_of(size: int) -> bytes:
        filler = size - len(message(ar=[opt_rr(option(65001, b""))]))
        return message(ar=[opt_rr(option(65001, bytes(filler)))])

    fits = query_of(65408 - 4)
    padded, _ = pad_query(fits)
    assert len(padded) == 65408
    too_big = query_of(65408 - 3)
    assert pad_query(too_big) == (too_big, False)
    assert pad_query(too_big)[0] is too_big
    largest = query_of(65535)
    assert pad_query(largest)[0] is largest


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x12\x34", id="short"),
        pytest.param(message(ar=[opt_rr(), opt_rr()]), id="two OPT"),
        pytest.param(message(ar=[opt_rr(owner=b"\x01a\x00")]), id="OPT not at root"),
        pytest.param(message(ar=[opt_rr(COOKIE[:-1]) + b"x"]), id="option overruns"),
        pytest.param(message(ar=[opt_rr(b"\x00\x0a\x00")]), id="option header cut"),
        pytest.param(message(ar=[opt_rr()])[:-1], id="OPT cut"),
        pytest.param(HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x05abc", id="question cut"),
    ],
)
def test_malformed_query_raises_formerr(wire: bytes) -> None:
    with pytest.raises(WireError) as caught:
        pad_query(wire)
    assert caught.value.rcode == dns.rcode.FORMERR


@pytest.mark.parametrize("block", [0, -128, 65536])
def test_block_out_of_range_is_a_value_error(block: int) -> None:
    with pytest.raises(ValueError, match="block"):
        pad_query(message(), block=block)


@SOME
@given(st.one_of(st.binary(max_size=300), mangled(queries().map(to_wire))))
def test_pad_query_on_any_bytes_pads_or_raises_wire_error(data: bytes) -> None:
    try:
        padded, _ = pad_query(data)
    except WireError:
        return
    assert padded is data or len(padded) % QUERY_BLOCK == 0


# --- strip_padding: properties ---------------------------------------------------------------


@SOME
@given(answers())
def test_stripped_answer_is_the_same_answer_without_padding(
    built: tuple[dns.message.Message, bytes],
) -> None:
    _, wire = built
    original = parse(wire)
    stripped = strip_padding(wire, remove_opt=False)
    got = parse(stripped)
    assert padding_options(got) == []
    assert_same_except_opt(got, original)
    assert_same_edns(got, original)
    if not padding_options(original):
        assert stripped is wire
    else:
        assert len(stripped) == len(wire) - sum(4 + len(p) for p in padding_options(original))


@SOME
@given(answers())
def test_remove_opt_takes_the_whole_opt_record_away(
    built: tuple[dns.message.Message, bytes],
) -> None:
    _, wire = built
    original = parse(wire)
    stripped = strip_padding(wire, remove_opt=True)
    got = parse(stripped)
    assert got.edns == -1
    assert got.options == ()
    assert_same_except_opt(got, original)
    if original.edns < 0:
        assert stripped is wire
    else:
        assert HEADER.unpack_from(stripped)[5] == HEADER.unpack_from(wire)[5] - 1


@SOME
@given(answers(), st.booleans())
def test_the_question_end_hint_changes_nothing_but_the_work(
    built: tuple[dns.message.Message, bytes], remove_opt: bool
) -> None:
    # The handler passes where the question ends (the answer matched the query's key).
    _, wire = built
    key = answer_question_key(wire)
    assume(key is not None)
    assert key is not None
    question_end = 12 + len(key)
    hinted = strip_padding(wire, remove_opt=remove_opt, question_end=question_end)
    assert hinted == strip_padding(wire, remove_opt=remove_opt)


@SOME
@given(queries(), st.sampled_from([QUERY_BLOCK, 468]))
def test_pad_query_with_the_question_end_hint_writes_the_same_bytes(
    query: dns.message.Message, block: int
) -> None:
    wire = to_wire(query)
    question_end = 12 + len(parse_query(wire).question)
    assert pad_query(wire, block=block, question_end=question_end) == pad_query(wire, block=block)


@SOME
@given(st.one_of(st.binary(max_size=300), mangled(answers().map(lambda built: built[1]))))
def test_strip_padding_never_raises(data: bytes) -> None:
    for remove_opt in (False, True):
        result = strip_padding(data, remove_opt=remove_opt)
        assert isinstance(result, bytes)
        assert len(result) <= len(data)


def _skip_rr(wire: bytes, offset: int) -> int:
    fixed = name_end(wire, offset)
    if fixed + 10 > len(wire):
        raise WireError("record runs past the end", rcode=Rcode.FORMERR)
    end = fixed + 10 + int.from_bytes(wire[fixed + 8 : fixed + 10], "big")
    if end > len(wire):
        raise WireError("record data runs past the end", rcode=Rcode.FORMERR)
    return end


def _rr_type(wire: bytes, start: int) -> int:
    fixed = name_end(wire, start)
    return int.from_bytes(wire[fixed : fixed + 2], "big")


def reference_layout(wire: bytes) -> tuple[int, tuple[int, int] | None, bool]:
    """The record walk done the plain way: every owner name through the full name check."""
    if len(wire) < 12:
        raise WireError("short", rcode=Rcode.FORMERR)
    _, _, qdcount, ancount, nscount, arcount = HEADER.unpack_from(wire)
    offset = 12
    for _ in range(qdcount):
        offset = _question_end(wire, offset)
    for _ in range(ancount + nscount):
        offset = _skip_rr(wire, offset)
    opt, signed = None, False
    for _ in range(arcount):
        start, offset = offset, _skip_rr(wire, offset)
        rr_type = _rr_type(wire, start)
        if rr_type == TYPE_OPT:
            if opt is not None or wire[start] != 0:
                raise WireError("bad OPT", rcode=Rcode.FORMERR)
            opt = (start, offset)
        elif rr_type in (24, 250):
            signed = True
    return offset, opt, signed


@SOME
@given(st.one_of(st.binary(max_size=300), mangled(answers().map(lambda built: built[1]))))
def test_fast_record_walk_agrees_with_the_plain_one(data: bytes) -> None:
    # message_layout skips the usual owner names inline (it runs on every answer): it must accept,
    # reject and locate exactly as the walk built from the wire module's helpers does.
    try:
        expected = reference_layout(data)
    except WireError:
        with pytest.raises(WireError):
            message_layout(data)
        return
    assert tuple(message_layout(data)) == expected


# --- strip_padding: examples -----------------------------------------------------------------


def test_answer_without_additional_records_is_returned_as_is() -> None:
    wire = message(flags=0x8180, an=A_RR)
    assert strip_padding(wire, remove_opt=False) is wire
    assert strip_padding(wire, remove_opt=True) is wire


def test_answer_without_padding_is_returned_as_is_even_when_it_must_be_walked() -> None:
    # The option code 0x000c occurs elsewhere (a PTR type), so the cheap scan cannot decide.
    ptr_rr = b"\xc0\x0c" + RR_FIXED.pack(12, 1, 300, 2) + b"\xc0\x0c"
    wire = message(flags=0x8180, an=ptr_rr, ar=[opt_rr(COOKIE)])
    assert b"\x00\x0c" in wire
    assert strip_padding(wire, remove_opt=False) is wire


def test_opt_between_other_additional_records_and_sig0() -> None:
    padded_opt = opt_rr(COOKIE + option(OPTION_PADDING, bytes(40)) + option(3, b"ns1"))
    wire = message(flags=0x8180, an=A_RR, ar=[A_RR, padded_opt, A_RR, SIG0_RR])
    stripped = strip_padding(wire, remove_opt=False)
    assert stripped == message(
        flags=0x8180, an=A_RR, ar=[A_RR, opt_rr(COOKIE + option(3, b"ns1")), A_RR, SIG0_RR]
    )
    removed = strip_padding(wire, remove_opt=True)
    assert removed == message(flags=0x8180, an=A_RR, ar=[A_RR, A_RR, SIG0_RR])


def test_every_padding_option_goes() -> None:
    pads = option(OPTION_PADDING, bytes(3)) + COOKIE + option(OPTION_PADDING, b"")
    wire = message(flags=0x8180, ar=[opt_rr(pads)])
    assert strip_padding(wire, remove_opt=False) == message(flags=0x8180, ar=[opt_rr(COOKIE)])


def test_remove_opt_does_not_need_readable_options() -> None:
    wire = message(flags=0x8180, ar=[opt_rr(b"\x00\x0c\x00\x09")])
    assert strip_padding(wire, remove_opt=False) is wire
    assert strip_padding(wire, remove_opt=True) == message(flags=0x8180)


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x00\x0c", id="short"),
        pytest.param(message(flags=0x8180, ar=[opt_rr(option(12, b"")), opt_rr()]), id="two OPT"),
        pytest.param(
            message(flags=0x8180, ar=[opt_rr(option(12, b""), owner=b"\x01a\x00")]),
            id="OPT not at root",
        ),
        pytest.param(message(flags=0x8180, ar=[opt_rr(option(12, b""))])[:-1], id="cut"),
        pytest.param(HEADER.pack(1, 0x8180, 1, 0, 0, 1) + b"\x05ab\x00\x0c", id="question cut"),
    ],
)
def test_malformed_answer_is_returned_unchanged(wire: bytes) -> None:
    assert strip_padding(wire, remove_opt=False) is wire
    assert strip_padding(wire, remove_opt=True) is wire


def test_unbound_style_468_byte_answer_shrinks_to_its_content() -> None:
    query = dns.message.make_query("example.com", "A", use_edns=0, pad=128)
    response = dns.message.make_response(query, pad=468)
    response.answer.append(dns.rrset.from_text("example.com.", 60, "IN", "A", "192.0.2.1"))
    wire = response.to_wire()
    assert len(wire) == 468
    stripped = strip_padding(wire, remove_opt=False)
    assert len(stripped) < 100
    assert parse(stripped).answer == response.answer


@FEW
@given(queries())
def test_padded_query_is_what_dnspython_itself_would_write(
    query: dns.message.Message,
) -> None:
    assume(query.edns >= 0)
    padded, _ = pad_query(to_wire(query))
    # dnspython re-encodes the padded query to the same bytes: nothing non-canonical was made.
    assert to_wire(dns.message.from_wire(padded)) == padded
