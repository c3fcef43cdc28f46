"""RoundSavingSender: SSLStream.send_all without its scheduling round, byte for byte the same.

The upstream's writer sends a batch that came alone through it, and a query alone on a quiet
connection is sent through it by its own task. Covered: on an idle stream the record is on
the socket before any other task runs (no round; with this trio the eager path must be live, or
the proxy quietly pays a round per write again); what it sends, mixed with the stream's own
send_all, arrives whole and in order; a record the kernel takes only part of is finished before
the next; with the stream's send lock held it waits its turn; a reset
connection is a BrokenResourceError; a stream that is not an SSLStream over an
EagerSocketStream has none.

TLS runs over a real socket pair, so that the kernel's send buffer can fill.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from dot_proxy.upstream.socket_stream import EagerSocketStream
from dot_proxy.upstream.trio_private import RoundSavingSender, round_saving_sender
from tests.fakes import tls_pair

TLS = trio.SSLStream[Any]


def sender(stream: TLS) -> RoundSavingSender:
    eager = round_saving_sender(stream)
    assert eager is not None, "the eager path is not live with this trio"
    return eager


async def socket_tls_pair(ca: trustme.CA, *, send_buffer: int | None = None) -> tuple[TLS, TLS]:
    """A client SSLStream over an EagerSocketStream and its server, handshake done."""
    left, right = socket.socketpair()
    if send_buffer is not None:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    return await tls_pair(ca, EagerSocketStream(left), EagerSocketStream(right))


@pytest.fixture
async def pair(ca: trustme.CA) -> AsyncIterator[tuple[TLS, TLS]]:
    client, server = await socket_tls_pair(ca)
    yield client, server
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def receive_exactly(stream: TLS, size: int) -> bytes:
    received = b""
    while len(received) < size:
        data = await stream.receive_some()
        assert data, "the stream ended early"
        received += data
    return received


async def test_an_idle_stream_sends_without_a_scheduling_round(pair: tuple[TLS, TLS]) -> None:
    client, server = pair
    send_all = sender(client).send_all
    others_ran = False

    async def other() -> None:
        nonlocal others_ran
        others_ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await send_all(b"query")
        assert not others_ran  # no round: the record went from here
    assert await receive_exactly(server, 5) == b"query"


@settings(max_examples=25, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=1, max_value=40000)),
        min_size=1,
        max_size=10,
    )
)
def test_eager_and_plain_sends_arrive_whole_and_in_order(
    ca: trustme.CA, writes: list[tuple[bool, int]]
) -> None:
    async def main() -> None:
        client, server = await socket_tls_pair(ca, send_buffer=4096)
        send_all = sender(client).send_all
        sent = [bytes([index % 251]) * size for index, (_, size) in enumerate(writes)]
        total = sum(len(data) for data in sent)
        async with trio.open_nursery() as nursery:

            async def write_all() -> None:
                for (eager, _), data in zip(writes, sent, strict=True):
                    await (send_all if eager else client.send_all)(data)

            nursery.start_soon(write_all)
            assert await receive_exactly(server, total) == b"".join(sent)
        await client.send_all(b"after")  # the stream is healthy afterwards
        assert await receive_exactly(server, 5) == b"after"
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)

    trio.run(main)


async def test_a_record_sent_in_part_is_finished_before_the_next(ca: trustme.CA) -> None:
    client, server = await socket_tls_pair(ca, send_buffer=4096)
    send_all = sender(client).send_all
    big, small = b"b" * 200_000, b"small"
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            await send_all(big)  # the kernel takes part; the rest goes under the lock
            await client.send_all(small)
            await send_all(small)

        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()  # the buffers are full: the rest waits
        received = await receive_exactly(server, len(big) + 2 * len(small))
    assert received == big + small + small
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_with_the_send_lock_held_it_waits_its_turn(pair: tuple[TLS, TLS]) -> None:
    # The lock's holder (in the proxy, the reader replying to a KeyUpdate) has records from
    # before this one: this one must not overtake them.
    client, server = pair
    send_all = sender(client).send_all
    sent = trio.Event()

    async def send() -> None:
        await send_all(b"query")
        sent.set()

    async with trio.open_nursery() as nursery:
        async with client._inner_send_lock:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
        await sent.wait()
    assert await receive_exactly(server, 5) == b"query"


async def test_a_reset_connection_is_a_broken_resource(ca: trustme.CA) -> None:
    client, server = await socket_tls_pair(ca)
    send_all = sender(client).send_all
    raw = server.transport_stream.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()  # RST
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await send_all(b"x" * 1000)
    await trio.aclose_forcefully(client)


async def test_a_stream_that_is_not_an_ssl_stream_over_a_socket_has_none(ca: trustme.CA) -> None:
    left, right = trio.testing.memory_stream_pair()
    client, _server = await tls_pair(ca, left, right)
    assert round_saving_sender(client) is None
    assert round_saving_sender(left) is None
