"""UDP size rules: TC=1 when an answer does not fit the client's limit, never over TCP.

The sizes here are those of the answer the client gets. Exact boundaries are tested with query
padding off, so that the upstream's answer reaches the client byte for byte; the main cases run
with padding on as well (the proxy then adds an OPT record to the upstream query and strips it
from the answer, which must not change the size rules).
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.clients import query, tcp_exchange, udp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    answering,
    txt_answer_for,
)

PADDING = [pytest.param(False, id="no-padding"), pytest.param(True, id="padding")]


def _sections(wire: bytes) -> tuple[int, int, int, int]:
    """QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT as sent."""
    return struct.unpack_from("!HHHH", wire, 4)  # type: ignore[return-value]


async def _proxy_answering(
    start_upstream: StartUpstream, start_proxy: StartProxy, size: int, *, padding: bool = False
) -> int:
    """A proxy whose upstream answers every query with TXT records, ``size`` bytes in all."""
    upstream = await start_upstream(answering(lambda wire: txt_answer_for(wire, size)))
    return (await start_proxy([upstream], padding=padding)).port


def _same_answer(one: bytes, other: bytes) -> bool:
    """The same message, but maybe for the order of the records in an RRset."""
    return len(one) == len(other) and dns.message.from_wire(one) == dns.message.from_wire(other)


async def _whole(port: int, request: dns.message.Message) -> bytes:
    reply = await tcp_exchange(port, request.to_wire())
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert not answer.flags & dns.flags.TC
    assert answer.id == request.id
    return reply


@pytest.mark.parametrize("padding", PADDING)
async def test_big_answer_without_edns_is_truncated_to_header_and_question(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, padding: bool
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, 700, padding=padding)
    request = query("big.example.", "TXT", use_edns=False)
    # The client's retry over TCP gets the whole answer, well over 512 bytes.
    whole = await _whole(port, request)
    assert len(whole) > 600
    assert _sections(whole)[3] == 0  # no OPT: the client sent none
    reply = await udp_exchange(port, request.to_wire())
    assert len(reply) <= 512
    answer = dns.message.from_wire(reply)
    assert answer.flags & dns.flags.TC
    assert answer.flags & dns.flags.QR
    assert answer.id == request.id
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.question == request.question
    assert _sections(reply) == (1, 0, 0, 0)
    assert reply[12:] == request.to_wire()[12:]  # header + question only


@pytest.mark.parametrize(("size", "truncated"), [(512, False), (513, True)])
async def test_the_512_byte_limit_without_edns_is_exact(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    size: int,
    truncated: bool,
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, size)
    request = query("edge.example.", "TXT", use_edns=False)
    whole = await _whole(port, request)
    assert len(whole) == size
    reply = await udp_exchange(port, request.to_wire())
    assert _same_answer(reply, whole) != truncated
    assert bool(dns.message.from_wire(reply).flags & dns.flags.TC) == truncated


@pytest.mark.parametrize("padding", PADDING)
async def test_edns_1232_answer_of_1000_bytes_passes_whole(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, padding: bool
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, 1000, padding=padding)
    request = query("mid.example.", "TXT", use_edns=0, payload=1232)
    reply = await udp_exchange(port, request.to_wire())
    assert 1000 - 14 < len(reply) <= 1000
    answer = dns.message.from_wire(reply)
    assert not answer.flags & dns.flags.TC
    assert answer.id == request.id
    expected = dns.message.from_wire(txt_answer_for(request.to_wire(), 1000))
    assert answer.answer == expected.answer  # every record (in the order the set gives)
    assert answer.edns == 0
    assert _same_answer(reply, await _whole(port, request))


@pytest.mark.parametrize("padding", PADDING)
async def test_edns_1232_answer_of_2000_bytes_is_truncated_keeping_opt(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, padding: bool
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, 2000, padding=padding)
    request = query("big.example.", "TXT", use_edns=0, payload=1232, want_dnssec=True)
    reply = await udp_exchange(port, request.to_wire())
    assert len(reply) <= 1232
    answer = dns.message.from_wire(reply)
    assert answer.flags & dns.flags.TC
    assert answer.id == request.id
    assert answer.question == request.question
    assert answer.answer == [] and answer.authority == []
    assert _sections(reply) == (1, 0, 0, 1)
    assert answer.edns == 0  # the OPT record is kept (RFC 6891 §7)
    assert len(await _whole(port, request)) > 2000 - 14


@pytest.mark.parametrize(("size", "truncated"), [(1232, False), (1233, True)])
async def test_the_edns_limit_is_exact(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    size: int,
    truncated: bool,
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, size)
    request = query("edge.example.", "TXT", use_edns=0, payload=1232)
    whole = await _whole(port, request)
    assert len(whole) == size
    reply = await udp_exchange(port, request.to_wire())
    assert _same_answer(reply, whole) != truncated
    assert bool(dns.message.from_wire(reply).flags & dns.flags.TC) == truncated


@pytest.mark.parametrize("payload", [0, 100, 511])
async def test_edns_payload_below_512_counts_as_512(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, payload: int
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, 500)
    request = query("small.example.", "TXT", use_edns=0, payload=payload)
    reply = await udp_exchange(port, request.to_wire())
    answer = dns.message.from_wire(reply)
    assert not answer.flags & dns.flags.TC
    assert len(reply) == 500


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("size", [2000, 4000, 65000])
async def test_tcp_answers_are_whole_whatever_the_edns_size(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    size: int,
    padding: bool,
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, size, padding=padding)
    for request in (
        query("big.example.", "TXT", use_edns=False),
        query("big.example.", "TXT", use_edns=0, payload=1232),
    ):
        reply = await _whole(port, request)
        # Whole: all the records, less at most an OPT record the proxy added and took away.
        assert size - 14 - 11 < len(reply) <= size


async def test_large_edns_payload_takes_a_large_udp_answer_whole(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    port = await _proxy_answering(start_upstream, start_proxy, 4000)
    request = query("big.example.", "TXT", use_edns=0, payload=4096)
    reply = await udp_exchange(port, request.to_wire())
    assert len(reply) == 4000
    assert not dns.message.from_wire(reply).flags & dns.flags.TC
