"""buffered_plaintext: every TLS record already received, decrypted without a scheduling round each.

The upstream's reader calls it after each ``SSLStream.receive_some``, which returns one record
at a time. Covered: all records that one transport read brought in come back, in order, and
then nothing; the stream works on afterwards; a close_notify behind the records is left to the
next ``receive_some`` (which then returns b""); a stream that is not an SSLStream drains
nothing. With the trio installed here the drain must be live: a trio that moved the SSLObject
would otherwise halve the proxy's throughput without failing anything (the first test fails).

TLS runs over ``trio.testing.memory_stream_pair``: what the server wrote arrives in one
transport read at the client, as many records do under load on a real socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.message
import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from dot_proxy.config import Config, parse_upstream
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.upstream import connection as connection_module
from dot_proxy.upstream.pool import Upstream, open_upstreams
from dot_proxy.upstream.trio_private import buffered_plaintext
from tests.fakes import answer_for, ask, tls_pair

TLS = trio.SSLStream[Any]
SSLPair = tuple[TLS, TLS]


async def ssl_pair(ca: trustme.CA) -> SSLPair:
    """A client and a server SSLStream over memory streams, handshake done."""
    return await tls_pair(ca, *trio.testing.memory_stream_pair())


@pytest.fixture
async def pair(ca: trustme.CA) -> AsyncIterator[SSLPair]:
    client, server = await ssl_pair(ca)
    yield client, server
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_every_record_one_read_brought_in_comes_back_in_order(pair: SSLPair) -> None:
    client, server = pair
    records = [bytes([index]) * (10 + index) for index in range(30)]
    for record in records:
        await server.send_all(record)  # one TLS record each
    drain = buffered_plaintext(client)

    first = await client.receive_some(65536)

    assert first == records[0]  # SSLStream gives one record per call...
    assert drain() == b"".join(records[1:]), "the drain is not live with this trio"
    assert drain() == b""  # ...and the drain the rest, once


async def test_the_stream_works_on_after_a_drain(pair: SSLPair) -> None:
    client, server = pair
    drain = buffered_plaintext(client)
    await server.send_all(b"one")
    await server.send_all(b"two")
    assert await client.receive_some() + drain() == b"onetwo"

    await server.send_all(b"three")
    assert await client.receive_some() == b"three"
    await client.send_all(b"question")
    assert await server.receive_some() == b"question"


async def test_a_close_notify_behind_the_records_is_left_to_the_next_receive(
    pair: SSLPair,
) -> None:
    client, server = pair
    await server.send_all(b"first")
    await server.send_all(b"last")
    async with trio.open_nursery() as nursery:
        # aclose waits for the peer's close_notify after sending its own: answer it.
        nursery.start_soon(server.aclose)
        drain = buffered_plaintext(client)
        assert await client.receive_some() == b"first"
        assert drain() == b"last"
        assert drain() == b""
        assert await client.receive_some() == b""  # the close_notify, as usual
        await client.aclose()


async def test_a_stream_that_is_not_tls_drains_nothing() -> None:
    left, right = trio.testing.memory_stream_pair()
    await right.send_all(b"plain bytes")
    drain = buffered_plaintext(left)
    assert drain() == b""
    assert await left.receive_some() == b"plain bytes"


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=20000), min_size=1, max_size=12))
def test_records_of_any_size_come_back_whole(ca: trustme.CA, sizes: list[int]) -> None:
    # Over 16 KiB a send is split into several records; any mix comes back byte for byte.
    async def main() -> None:
        client, server = await ssl_pair(ca)
        sent = [bytes([index % 251]) * size for index, size in enumerate(sizes)]
        for data in sent:
            await server.send_all(data)
        drain = buffered_plaintext(client)
        received = b""
        while len(received) < sum(sizes):
            received += await client.receive_some(65536) + drain()
        assert received == b"".join(sent)

    trio.run(main)


class Corked(trio.abc.SendStream):
    """A send stream that holds what is written until ``uncork``, then sends it in one go."""

    def __init__(self, inner: trio.abc.SendStream) -> None:
        self.inner = inner
        self.held: list[bytes] | None = None

    def cork(self) -> None:
        self.held = []

    async def uncork(self) -> None:
        held, self.held = self.held or [], None
        await self.inner.send_all(b"".join(held))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.held is None:
            await self.inner.send_all(data)
        else:
            self.held.append(bytes(data))
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RoundCounter(trio.abc.Instrument):
    """Counts the run loop's rounds: one I/O check each."""

    def __init__(self) -> None:
        self.rounds = 0

    def before_io_wait(self, timeout: float) -> None:
        self.rounds += 1


async def test_a_burst_of_answer_records_reaches_its_queries_in_a_round_or_two(
    ca: trustme.CA, ca_file: str, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    # The point of the drain: 20 answers in 20 records, arriving in one read, wake their 20
    # queries together. One record per receive_some would take a round per answer.
    burst = 20
    corked: list[Corked] = []
    queries_in = trio.Event()

    async def upstream_side(server: TLS) -> None:
        decoder, queries = FrameDecoder(), list[bytes]()
        while len(queries) < burst:
            decoder.feed(await server.receive_some())
            while (message := decoder.next_message()) is not NEED_DATA:
                queries.append(message)
        corked[0].cork()
        for query in queries:
            await server.send_all(frame(answer_for(query)))  # one record each
        queries_in.set()

    async def open_tls(_spec: object, _context: object, _sessions: object = None) -> TLS:
        client_transport, server_transport = trio.testing.memory_stream_pair()
        corked.append(Corked(server_transport.send_stream))
        server_transport.send_stream = corked[0]  # type: ignore[assignment]
        client, server = await tls_pair(ca, client_transport, server_transport)
        nursery.start_soon(upstream_side, server)
        return client

    monkeypatch.setattr(connection_module, "open_tls", open_tls)
    monkeypatch.setattr(connection_module, "quickack_hook", lambda _stream: None)
    answered: list[dns.message.Message] = []
    config = Config(upstreams=(parse_upstream("127.0.0.1:853#dns.test"),), ca_file=ca_file)
    async with open_upstreams(config) as [upstream], trio.open_nursery() as queries:
        for index in range(burst):
            queries.start_soon(_ask_into, upstream, f"q{index}.drain.test.", answered)
        await queries_in.wait()
        counter = RoundCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            await corked[0].uncork()
            await _until(lambda: len(answered) == burst)
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert sorted(a.question[0].name.to_text() for a in answered) == sorted(
        f"q{i}.drain.test." for i in range(burst)
    )
    # 5 here; 23 with one record per receive_some (a round per answer, and the waiting).
    assert counter.rounds <= 8, f"{burst} answers took {counter.rounds} rounds"


async def _ask_into(upstream: Upstream, name: str, answered: list[dns.message.Message]) -> None:
    answered.append(await ask(upstream, name))


async def _until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.lowlevel.checkpoint()
