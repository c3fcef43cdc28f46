"""Fake DoT upstreams for the fuzz target: byte pipes in memory, answers from dnspython.

A :class:`FakeNetwork` stands in for ``dot_proxy.upstream.connection.open_tls``: each connection the
pool opens gets one end of ``trio.testing.memory_stream_pair()``, and a task serving the other end
does what the upstream's :class:`Mode` says, query by query. Everything it sends is kept in
``FakeNetwork.sent`` for the invariants (fuzz/invariants.py).
"""

from __future__ import annotations

import enum
import ssl
import struct
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Final

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio
import trio.testing

from dot_proxy.config import UpstreamSpec
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.core.message import parse_query
from dot_proxy.errors import UpstreamConnectError, UpstreamTLSError, WireError

__all__ = ["FakeNetwork", "Mode", "answer_bytes", "parses"]

SLOW_DELAY: Final = 0.3  # over the 0.1 s hedge floor: hedging kicks in
STALL_DELAY: Final = 2.5  # over the 1 s stall timeout, under the 5 s deadline
_HEADER = struct.Struct("!HHHHHH")


class Mode(enum.IntEnum):
    """What a fake upstream does with each query (or connection attempt)."""

    ANSWER = 0  # dnspython's answer; padded to 468 when the query was padded (RFC 8467)
    SERVFAIL = 1
    REFUSED = 2
    BIG = 3  # TXT records, about 2 kB: over every UDP limit up to 1,232
    PADDED = 4  # an OPT record with Padding even when the query had none
    TRUNCATED = 5  # TC set, no records
    HANG = 6
    CLOSE = 7
    CLOSE_MID_FRAME = 8
    WRONG_QUESTION_FIRST = 9
    WRONG_ID_FIRST = 10
    GARBAGE = 11  # a frame too short to be DNS
    TWICE = 12
    SLOW = 13
    STALL = 14
    UPPERCASE = 15  # the question's case flipped (RFC 4343: still the same question)
    ECHO = 16  # the query's own bytes with QR set: may not even parse
    HUGE_PREFIX = 17  # a length prefix of 65,535, then nothing
    CONNECT_REFUSED = 18
    CONNECT_HANG = 19
    TLS_FAILS = 20


def _request(query: bytes) -> dns.message.Message | None:
    """The query as dnspython reads it; its question alone if the rest does not parse."""
    try:
        return dns.message.from_wire(query)
    except Exception:  # dnspython raises many types for bad input; any means "not whole"
        pass
    try:
        parsed = parse_query(query)
    except WireError:
        return None
    try:
        return dns.message.from_wire(
            _HEADER.pack(parsed.id, parsed.flags, 1, 0, 0, 0) + parsed.question
        )
    except Exception:
        return None


def _raw_reply(query: bytes, rcode: int) -> bytes:
    """The query echoed with QR and ``rcode``: for queries dnspython cannot answer."""
    flags = bytes([query[2] | 0x80, (query[3] & 0xF0) | rcode])
    return query[:2] + flags + query[4:]


# Record data built once: parsing rdata text costs more than the rest of a fake answer.
_A = dns.rdata.from_text("IN", "A", "192.0.2.1")
_AAAA = dns.rdata.from_text("IN", "AAAA", "2001:db8::1")
_BIG_TXT = tuple(
    dns.rdata.from_text("IN", "TXT", f'"{index:02d}{"x" * 190}"') for index in range(11)
)


def _response(request: dns.message.Message, mode: Mode) -> dns.message.Message:
    response = dns.message.make_response(request)
    question = request.question[0] if request.question else None
    if mode is Mode.SERVFAIL:
        response.set_rcode(dns.rcode.SERVFAIL)
    elif mode is Mode.REFUSED:
        response.set_rcode(dns.rcode.REFUSED)
    elif mode is Mode.TRUNCATED:
        response.flags |= dns.flags.TC
    elif mode is Mode.PADDED:
        response.use_edns(0, payload=1232, pad=468)
    elif question is None:
        pass
    elif mode is Mode.BIG:
        response.answer.append(dns.rrset.from_rdata_list(question.name, 300, _BIG_TXT))
    elif (question.rdclass, question.rdtype) == (dns.rdataclass.IN, dns.rdatatype.A):
        response.answer.append(dns.rrset.from_rdata(question.name, 300, _A))
    elif (question.rdclass, question.rdtype) == (dns.rdataclass.IN, dns.rdatatype.AAAA):
        response.answer.append(dns.rrset.from_rdata(question.name, 300, _AAAA))
    return response


def answer_bytes(query: bytes, mode: Mode) -> bytes:
    """The fake's answer to ``query``: dnspython's, or the query echoed when it cannot answer."""
    if mode is Mode.ECHO:
        return _raw_reply(query, 0)
    request = _request(query)
    if request is None:
        return _raw_reply(query, dns.rcode.SERVFAIL)
    try:
        # want_shuffle=False: dnspython shuffles RRsets by default; runs must repeat exactly.
        wire: bytes = _response(request, mode).to_wire(max_size=65535, want_shuffle=False)
    except Exception:  # e.g. a TSIG-signed query dnspython cannot sign an answer for
        return _raw_reply(query, dns.rcode.SERVFAIL)
    return _flip_question_case(wire) if mode is Mode.UPPERCASE else wire


def _flip_question_case(answer: bytes) -> bytes:
    out = bytearray(answer)
    offset = _HEADER.size
    while offset < len(out) and 0 < out[offset] < 64:
        end = offset + 1 + out[offset]
        out[offset + 1 : end] = out[offset + 1 : end].swapcase()
        offset = end
    return bytes(out)


def parses(wire: bytes) -> bool:
    try:
        dns.message.from_wire(wire)
    except Exception:
        return False
    return True


@dataclass
class FakeNetwork:
    """The fake upstreams of one run, reached through the swapped ``open_tls``."""

    modes: tuple[Mode, ...]
    nursery: trio.Nursery
    ports: dict[int, int] = field(default_factory=dict)  # port -> upstream index
    # Every answer made, whether the mode then sends it whole, cut, late or not at all.
    sent: list[bytes] = field(default_factory=list)

    async def open_tls(
        self, spec: UpstreamSpec, _context: ssl.SSLContext, _sessions: object = None
    ) -> trio.abc.Stream:
        """Stands in for ``dot_proxy.upstream.connection.open_tls``: same errors, no socket."""
        mode = self.modes[self.ports[spec.port]]
        await trio.lowlevel.checkpoint()
        if mode is Mode.CONNECT_REFUSED:
            raise UpstreamConnectError(f"{spec.label}: connect failed: refused (fake)")
        if mode is Mode.CONNECT_HANG:
            await trio.sleep_forever()
        if mode is Mode.TLS_FAILS:
            raise UpstreamTLSError(f"{spec.label}: TLS handshake failed: alert (fake)")
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server, mode)
        return client

    async def _serve(self, stream: trio.abc.Stream, mode: Mode) -> None:
        decoder = FrameDecoder()
        lock = trio.Lock()  # delayed answers share the stream: one send_all at a time
        try:
            async with trio.open_nursery() as later:
                while data := await stream.receive_some(65536):
                    decoder.feed(data)
                    while (query := decoder.next_message()) is not NEED_DATA:
                        if not await self._respond(stream, lock, later, mode, query):
                            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the proxy closed the connection: what it does at the end of every run
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(
        self,
        stream: trio.abc.Stream,
        lock: trio.Lock,
        later: trio.Nursery,
        mode: Mode,
        query: bytes,
    ) -> bool:
        """Act on one query; False to close the connection."""
        if mode in (Mode.CLOSE, Mode.HANG) or len(query) < _HEADER.size:
            return mode is not Mode.CLOSE
        answer = answer_bytes(query, mode)
        self.sent.append(answer)
        framed = frame(answer)
        async with lock:
            if mode is Mode.CLOSE_MID_FRAME:
                await stream.send_all(framed[: len(framed) // 2])
                return False
            if mode is Mode.GARBAGE:
                await stream.send_all(frame(b"junk"))
            elif mode is Mode.HUGE_PREFIX:
                await stream.send_all(b"\xff\xff" + framed[2:])
                return True
            elif mode is Mode.WRONG_QUESTION_FIRST:
                other = answer_bytes(_other_question(query), Mode.ANSWER)
                await stream.send_all(frame(other) + framed)
            elif mode is Mode.WRONG_ID_FIRST:
                other_id = ((query[0] << 8 | query[1]) ^ 0x5A5A).to_bytes(2, "big")
                await stream.send_all(frame(other_id + answer[2:]) + framed)
            elif mode is Mode.TWICE:
                await stream.send_all(framed + framed)
            elif mode in (Mode.SLOW, Mode.STALL):
                delay = SLOW_DELAY if mode is Mode.SLOW else STALL_DELAY
                later.start_soon(_send_later, stream, lock, framed, delay)
            else:
                await stream.send_all(framed)
        return True


def _other_question(query: bytes) -> bytes:
    """A query with the same ID for another name (``wrong.example. A``)."""
    request = dns.message.make_query("wrong.example.", "A")
    request.id = (query[0] << 8) | query[1]
    wire: bytes = request.to_wire()
    return wire


async def _send_later(stream: trio.abc.Stream, lock: trio.Lock, data: bytes, delay: float) -> None:
    await trio.sleep(delay)
    async with lock:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)  # the run may have ended meanwhile
