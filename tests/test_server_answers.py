"""The proxy in-process against the fake DoT upstream: answers, IDs, EDNS, answer matching."""

from __future__ import annotations

import logging

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import trio
import trio.testing

from dot_proxy.core.message import message_id, replace_id
from tests.clients import TcpClient, query, tcp_exchange, udp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    answer_for,
    spoiled_first,
)

EXCHANGES = [pytest.param(udp_exchange, id="udp"), pytest.param(tcp_exchange, id="tcp")]


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_answer_comes_back_with_the_client_id(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, exchange: object
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    for client_id in (0, 1, 0xBEEF, 0xFFFF):
        request = query("Example.COM.", "A")
        request.id = client_id
        reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
        answer = dns.message.from_wire(reply)
        assert answer.id == client_id
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.question == request.question
        assert str(answer.answer[0][0]) == "192.0.2.1"
    # The upstream saw the same bytes but for the ID the proxy chose.
    assert len(upstream.queries) == 4


def _client_query_with_edns() -> dns.message.Message:
    options = [
        dns.edns.ECSOption("198.51.100.0", 24),
        dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
        dns.edns.GenericOption(65001, b"private option data"),
    ]
    request = query("example.org.", "AAAA")
    request.use_edns(0, dns.flags.DO, 1400, options=options)
    request.flags |= dns.flags.CD
    return request


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_edns_options_and_do_bit_reach_the_upstream_untouched(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, exchange: object
) -> None:
    # --keep-ecs: the client's subnet goes too (by default it is removed: tests/test_split_dns.py).
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], padding=False, keep_ecs=True)
    request = _client_query_with_edns()
    wire = request.to_wire()
    reply = await exchange(proxy.port, wire)  # type: ignore[operator]
    assert dns.message.from_wire(reply).id == request.id
    assert len(upstream.queries) == 1
    sent = upstream.queries[0]
    assert sent[2:] == wire[2:]  # flags, question, OPT with its options and DO: byte for byte
    forwarded = dns.message.from_wire(sent)
    assert forwarded.ednsflags & dns.flags.DO
    assert forwarded.payload == 1400
    assert forwarded.options == request.options


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_with_padding_the_client_edns_options_and_do_bit_still_pass_through(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, exchange: object
) -> None:
    # Padding (RFC 8467) adds an option for the TLS hop; everything the client sent is kept.
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], padding=True, keep_ecs=True)
    request = _client_query_with_edns()
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    assert dns.message.from_wire(reply).id == request.id
    forwarded = dns.message.from_wire(upstream.queries[0])
    assert forwarded.flags == request.flags
    assert forwarded.question == request.question
    assert forwarded.ednsflags == request.ednsflags  # DO
    assert forwarded.payload == 1400
    padding = dns.edns.OptionType.PADDING
    assert [o for o in forwarded.options if o.otype != padding] == list(request.options)
    assert len(upstream.queries[0]) % 128 == 0


@pytest.mark.parametrize("padding", [False, True])
async def test_big_udp_query_is_read_whole(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, padding: bool
) -> None:
    # Datagrams up to 65,535 bytes are read whole: a query of ~4 KB arrives intact.
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], padding=padding)
    request = query("example.net.", "A")
    request.use_edns(0, 0, 4096, options=[dns.edns.GenericOption(65001, b"\xa5" * 4000)])
    wire = request.to_wire()
    assert len(wire) > 4000
    reply = await udp_exchange(proxy.port, wire)
    assert dns.message.from_wire(reply).id == request.id
    forwarded = dns.message.from_wire(upstream.queries[0])
    assert forwarded.options[0] == request.options[0]
    if not padding:
        assert upstream.queries[0][2:] == wire[2:]


def _wrong_id(query_wire: bytes) -> bytes:
    answer = answer_for(query_wire, address="192.0.2.66")
    return replace_id(answer, message_id(answer) ^ 0x5A5A)


def _not_a_response(query_wire: bytes) -> bytes:
    answer = answer_for(query_wire, address="192.0.2.66")
    return answer[:2] + bytes([answer[2] & 0x7F]) + answer[3:]  # QR cleared


def _other_question(query_wire: bytes) -> bytes:
    other = dns.message.make_query("evil.example.", "A", id=message_id(query_wire))
    return answer_for(other.to_wire(), address="192.0.2.66")


def _other_type(query_wire: bytes) -> bytes:
    asked = dns.message.from_wire(query_wire).question[0]
    assert asked.rdtype == dns.rdatatype.AAAA
    return answer_for(dns.message.make_query(asked.name, "A", id=message_id(query_wire)).to_wire())


SPOILERS = [
    pytest.param(_wrong_id, id="wrong-id"),
    pytest.param(_not_a_response, id="qr-clear"),
    pytest.param(_other_question, id="other-name"),
]


@pytest.mark.parametrize("spoil", SPOILERS)
@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_a_mismatched_answer_is_never_passed_on(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    spoil: object,
    exchange: object,
) -> None:
    upstream = await start_upstream(spoiled_first(spoil, then_answer=True))  # type: ignore[arg-type]
    proxy = await start_proxy([upstream])
    request = query("www.example.com.", "A")
    reply = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    answer = dns.message.from_wire(reply)
    assert answer.id == request.id
    assert answer.question == request.question
    assert [str(rr) for rr in answer.answer[0]] == ["192.0.2.1"]  # the right one, sent after


async def test_an_answer_for_another_type_is_never_passed_on(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream(spoiled_first(_other_type, then_answer=True))
    proxy = await start_proxy([upstream])
    request = query("www.example.com.", "AAAA")
    answer = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    assert answer.question == request.question


@pytest.mark.parametrize("spoil", SPOILERS)
async def test_only_mismatched_answers_give_servfail_at_the_deadline(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    spoil: object,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream(spoiled_first(spoil, then_answer=False))  # type: ignore[arg-type]
    proxy = await start_proxy([upstream], timeout=5.0)
    request = query("www.example.com.", "A")
    start = trio.current_time()
    answer = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert answer.id == request.id
    assert answer.question == request.question
    assert answer.answer == []
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)


async def test_no_per_query_logging_at_info(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dot_proxy")
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    startup = [record.getMessage() for record in caplog.records]
    assert f"listening on udp 127.0.0.1:{proxy.port}" in startup
    assert f"listening on tcp 127.0.0.1:{proxy.port}" in startup
    assert f"forwarding over TLS to {upstream.spec}" in startup
    caplog.clear()
    for _ in range(3):
        await udp_exchange(proxy.port, query().to_wire())
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        await client.send(query().to_wire())
        assert await client.receive() is not None
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
