"""Bad input: dropped or answered with FORMERR/NOTIMP, and never the end of a serve loop."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dns.message
import dns.opcode
import dns.rcode
import pytest
import trio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dot_proxy.config import Config, parse_upstream
from dot_proxy.handler import ServerStats
from dot_proxy.serve.server import serve
from tests.clients import TcpClient, query, udp_exchange, udp_receive_answer, udp_send
from tests.conftest import RunningProxy, StartProxy, StartUpstream
from tests.fakes import (
    FakeUpstream,
    answer_anything,
    answering,
)

QR = 0x8000


def _header(msg_id: int, flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", msg_id, flags, qd, an, ns, ar)


def _with_flags(message: dns.message.Message, flags: int) -> bytes:
    wire = message.to_wire()
    return wire[:2] + flags.to_bytes(2, "big") + wire[4:]


async def _next_datagram_answers(sock: trio.socket.SocketType, good: dns.message.Message) -> None:
    """The first datagram that comes back is the answer to ``good``: nothing came before."""
    answer = dns.message.from_wire(await sock.recv(65535))
    assert answer.id == good.id
    assert answer.question == good.question
    assert answer.rcode() == dns.rcode.NOERROR


SHORT = [b"", b"\x12", b"\x12\x34\x01\x00\x00\x01", b"\xff" * 11]


async def test_datagrams_shorter_than_a_header_get_no_reply(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    sock = await udp_send(proxy.port, SHORT[0])
    with sock:
        for data in SHORT[1:]:
            await sock.send(data)
        good = query("good.example.", "A")
        await sock.send(good.to_wire())
        await _next_datagram_answers(sock, good)
    assert proxy.stats.malformed == len(SHORT)
    assert len(upstream.queries) == 1


async def test_a_response_sent_as_a_query_is_dropped(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # A response gets nothing, of whatever rcode: answering one would reflect our answers at
    # a spoofed source, and let two servers bounce errors at each other forever.
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    request = query("ping.pong.", "A")
    sock = await udp_send(proxy.port, _with_flags(request, QR | dns.rcode.SERVFAIL))
    with sock:
        await sock.send(_with_flags(request, QR | 0x0100 | dns.rcode.FORMERR))
        await sock.send(_with_flags(request, QR | 0x0100))
        good = query("good.example.", "A")
        await sock.send(good.to_wire())
        await _next_datagram_answers(sock, good)
    # Over TCP too: the connection stays, and the next query on it is answered.
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        await client.send(_with_flags(request, QR | 0x0100))
        await client.send(good.to_wire())
        reply = await client.receive()
    assert reply is not None
    assert dns.message.from_wire(reply).id == good.id
    assert proxy.stats.malformed == 4
    assert len(upstream.queries) == 2


async def _expect_error(proxy: RunningProxy, data: bytes, rcode: int, msg_id: int) -> None:
    for over_tcp in (False, True):
        if over_tcp:
            client = await TcpClient.connect(proxy.port)
            async with client.stream:
                await client.send(data)
                reply = await client.receive()
        else:
            reply = await udp_exchange(proxy.port, data)
        assert reply is not None
        header = struct.unpack_from("!HH", reply)
        assert header[0] == msg_id
        assert header[1] & QR
        assert header[1] & 0xF == rcode


@pytest.mark.parametrize(
    "opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.IQUERY, dns.opcode.STATUS, 15]
)
async def test_opcodes_other_than_query_get_notimp(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, opcode: int
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    request = query("zone.example.", "SOA")
    data = _with_flags(request, (opcode << 11) | 0x0100)
    await _expect_error(proxy, data, dns.rcode.NOTIMP, request.id)
    assert upstream.queries == []


GARBAGE_QUESTIONS = [
    pytest.param(_header(7, 0x0100) + b"\x07exam", id="name-runs-off-the-end"),
    pytest.param(_header(7, 0x0100) + b"\x07example\x00\x00", id="type-cut-short"),
    pytest.param(_header(7, 0x0100) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", id="label-64"),
    pytest.param(_header(7, 0x0100) + b"\xc0\x0c\x00\x01\x00\x01", id="pointer-in-question"),
    pytest.param(_header(7, 0x0100) + b"\x80abc\x00\x00\x01\x00\x01", id="bad-label-type"),
    pytest.param(
        _header(7, 0x0100) + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", id="name-too-long"
    ),
    pytest.param(_header(7, 0x0100, qd=0), id="no-question"),
    pytest.param(_header(7, 0x0100, qd=2) + b"\x01a\x00\x00\x01\x00\x01" * 2, id="two-questions"),
    pytest.param(
        _header(7, 0x0100, ar=1) + b"\x01a\x00\x00\x01\x00\x01" + b"\x00\x00\x29",
        id="record-cut-short",
    ),
]


@pytest.mark.parametrize("data", GARBAGE_QUESTIONS)
async def test_garbage_question_gets_formerr(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, data: bytes
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    await _expect_error(proxy, data, dns.rcode.FORMERR, 7)
    assert proxy.stats.malformed == 2
    assert upstream.queries == []


async def test_zero_length_and_short_frames_over_tcp_keep_the_connection(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        good = query("good.example.", "A")
        await client.send(b"", b"\x01", b"\x00" * 11, good.to_wire())
        reply = await client.receive()
        assert reply is not None
        answer = dns.message.from_wire(reply)  # the first frame back answers the good query
        assert answer.id == good.id
        assert answer.question == good.question
    assert proxy.stats.malformed == 3


# --- random input ---------------------------------------------------------------------------

# Headers that look like a query, so that parsing goes past the header into the question.
_query_headers = st.builds(
    _header,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF).map(lambda flags: flags & 0x07FF),
    st.integers(0, 2),
    st.integers(0, 2),
    st.integers(0, 2),
    st.integers(0, 2),
)
_valid_wire = query("fuzz.example.", "A", use_edns=0, want_dnssec=True).to_wire()
_mutations = st.lists(
    st.tuples(st.integers(0, len(_valid_wire) - 1), st.integers(0, 255)), min_size=1, max_size=6
)


def _mutate(changes: list[tuple[int, int]]) -> bytes:
    data = bytearray(_valid_wire)
    for index, value in changes:
        data[index] = value
    return bytes(data)


GARBAGE = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=12, max_size=700),
    st.tuples(_query_headers, st.binary(max_size=300)).map(b"".join),
    _mutations.map(_mutate),
)
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A hang guard only: on loopback the good answer comes in milliseconds; this bounds a broken run.
HANG_GUARD = 60


@asynccontextmanager
async def _proxy(ca: trustme.CA, ca_file: str) -> AsyncIterator[tuple[int, ServerStats]]:
    """A fake upstream and a proxy for one hypothesis example (fixtures live per test)."""
    async with trio.open_nursery() as nursery:
        upstream = FakeUpstream(ca, behaviour=answering(answer_anything))
        await nursery.start(upstream.serve)
        config = Config(
            upstreams=(parse_upstream(upstream.spec),),
            listen=("127.0.0.1",),
            port=0,
            ca_file=ca_file,
        )
        stats = ServerStats()

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(config, stats=stats, task_status=task_status)

        bound = await nursery.start(run)
        yield bound[0][2], stats
        nursery.cancel_scope.cancel()


@SETTINGS
@given(datagrams=st.lists(GARBAGE, min_size=1, max_size=8))
async def test_random_datagrams_never_kill_the_udp_loop(
    ca: trustme.CA, ca_file: str, datagrams: list[bytes]
) -> None:
    async with _proxy(ca, ca_file) as (port, stats):
        with trio.fail_after(HANG_GUARD):
            sock = await udp_send(port, datagrams[0])
            with sock:
                for data in datagrams[1:]:
                    await sock.send(data)
                good = query("after.example.", "A")
                await sock.send(good.to_wire())
                answer = await udp_receive_answer(sock, good)
                assert answer.rcode() == dns.rcode.NOERROR
                # And from another client too.
                other = query("other.example.", "AAAA")
                with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
                    await fresh.connect(("127.0.0.1", port))
                    await fresh.send(other.to_wire())
                    assert (await udp_receive_answer(fresh, other)).id == other.id
    assert stats.errors == 0  # no garbage reached the catch-all for bugs


@SETTINGS
@given(frames=st.lists(GARBAGE, min_size=1, max_size=8), raw=st.binary(max_size=200))
async def test_random_frames_never_kill_the_tcp_loop(
    ca: trustme.CA, ca_file: str, frames: list[bytes], raw: bytes
) -> None:
    async with _proxy(ca, ca_file) as (port, stats):
        with trio.fail_after(HANG_GUARD):
            # Framed garbage, a zero-length frame among it, then a good query: same connection.
            client = await TcpClient.connect(port)
            async with client.stream:
                good = query("after.example.", "A")
                await client.send(*frames, b"", good.to_wire())
                while True:
                    reply = await client.receive()
                    assert reply is not None, "the connection closed before the good answer"
                    try:
                        answer = dns.message.from_wire(reply)
                    except Exception:
                        continue
                    if answer.id == good.id and answer.question == good.question:
                        break
            # Raw bytes (any length prefix), then the client goes away.
            client = await TcpClient.connect(port)
            async with client.stream:
                await client.stream.send_all(raw)
            # The accept loop still serves a new client.
            client = await TcpClient.connect(port)
            async with client.stream:
                good = query("new.example.", "A")
                await client.send(good.to_wire())
                reply = await client.receive()
                assert reply is not None
                assert dns.message.from_wire(reply).id == good.id
    assert stats.malformed >= 1  # the zero-length frame at least
    assert stats.errors == 0
