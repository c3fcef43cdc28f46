"""EagerSocketStream: the bare-socket transport under the upstream's trio.SSLStream.

Covered: bytes both ways (``max_bytes`` respected); a send far larger than the kernel's buffers,
which must wait for writability while a reader drains the peer; EOF both ways (``send_eof``, the
peer closing or shutting down); OS errors raised as ``trio.BrokenResourceError``; use after
``aclose`` raising ``trio.ClosedResourceError``, in a task already blocked on the socket too;
the scheduling point every ``_YIELD_EVERY`` reads; cancellation of a blocked receive; and a TLS
handshake and exchange with an ``SSLStream`` on each end.

Sockets come from ``socket.socketpair()`` or a TCP pair on 127.0.0.1, port chosen by the kernel.
Nothing waits on the wall clock: tasks meet through ``wait_all_tasks_blocked`` or a MockClock.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
import trustme

from dot_proxy.config import parse_upstream
from dot_proxy.upstream.socket_stream import EagerSocketStream
from dot_proxy.upstream.tls import make_ssl_context, open_tls
from tests.conftest import StartUpstream
from tests.fakes import tls_pair

YIELD_EVERY = EagerSocketStream._YIELD_EVERY
MORE_THAN_THE_KERNEL_BUFFERS = 8 * 1024 * 1024

StreamAndPeer = tuple[EagerSocketStream, socket.socket]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback, on a port the kernel picked."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


@pytest.fixture
def pair() -> Iterator[StreamAndPeer]:
    """Our stream over one end of a socketpair; the other end is a plain socket.

    The peer does not block: on a socketpair what one end sends is readable at the other at
    once, so a ``peer.recv`` that finds nothing fails the test instead of hanging it.
    """
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    with ours, peer:
        yield EagerSocketStream(ours), peer


@pytest.fixture
def two_streams() -> Iterator[tuple[EagerSocketStream, EagerSocketStream]]:
    """An EagerSocketStream over each end of one socketpair."""
    left, right = socket.socketpair()
    with left, right:
        yield EagerSocketStream(left), EagerSocketStream(right)


async def test_bytes_go_both_ways_and_max_bytes_is_respected(pair: StreamAndPeer) -> None:
    stream, peer = pair
    await stream.wait_send_all_might_not_block()
    await stream.send_all(b"query")
    assert peer.recv(100) == b"query"

    peer.sendall(b"hello world")
    assert await stream.receive_some(5) == b"hello"
    assert await stream.receive_some() == b" world"


async def test_a_zero_byte_receive_is_refused_rather_than_read_as_end_of_stream(
    pair: StreamAndPeer,
) -> None:
    stream, peer = pair
    peer.sendall(b"data")
    with pytest.raises(ValueError, match="max_bytes"):
        await stream.receive_some(0)
    assert await stream.receive_some() == b"data"


async def test_a_send_larger_than_the_kernel_buffers_waits_for_the_reader(
    two_streams: tuple[EagerSocketStream, EagerSocketStream],
) -> None:
    sender, reader = two_streams
    payload = random.Random(7858).randbytes(MORE_THAN_THE_KERNEL_BUFFERS)
    received = bytearray()
    chunks = 0

    async def read_to_eof() -> None:
        nonlocal chunks
        while chunk := await reader.receive_some():
            received.extend(chunk)
            chunks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_to_eof)
        # The reader can only run while send_all waits for the socket to become writable.
        await sender.send_all(payload)
        await sender.send_eof()

    assert received == payload
    assert chunks > 1


@pytest.mark.parametrize("how", ["close", "shutdown"])
async def test_receive_some_returns_empty_bytes_once_the_peer_stops_writing(
    pair: StreamAndPeer, how: str
) -> None:
    stream, peer = pair
    peer.sendall(b"last words")
    if how == "close":
        peer.close()
    else:
        peer.shutdown(socket.SHUT_WR)
    assert await stream.receive_some() == b"last words"
    assert await stream.receive_some() == b""


async def test_send_eof_ends_our_direction_only(pair: StreamAndPeer) -> None:
    stream, peer = pair
    await stream.send_all(b"request")
    await stream.send_eof()
    assert peer.recv(100) == b"request"
    assert peer.recv(100) == b""

    peer.sendall(b"reply after our EOF")
    assert await stream.receive_some() == b"reply after our EOF"


def closed_socketpair_end() -> tuple[socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    peer.close()
    return ours, peer


def reset_tcp_peer() -> tuple[socket.socket, socket.socket]:
    ours, peer = tcp_pair()
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    return ours, peer


@pytest.mark.parametrize("gone_peer", [closed_socketpair_end, reset_tcp_peer])
async def test_sending_to_a_gone_peer_raises_broken_resource_error(
    gone_peer: Callable[[], tuple[socket.socket, socket.socket]],
) -> None:
    ours, _ = gone_peer()
    stream = EagerSocketStream(ours)
    with pytest.raises(trio.BrokenResourceError) as caught:
        for _ in range(1000):  # the first send may still be taken before the error shows
            await stream.send_all(b"x" * 1024)
    assert isinstance(caught.value.__cause__, OSError)
    await stream.aclose()


async def test_receiving_from_a_reset_peer_raises_broken_resource_error() -> None:
    ours, _ = reset_tcp_peer()
    stream = EagerSocketStream(ours)
    with pytest.raises(trio.BrokenResourceError) as caught:
        await stream.receive_some()
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    await stream.aclose()


async def test_every_operation_after_aclose_raises_closed_resource_error(
    pair: StreamAndPeer,
) -> None:
    stream, _ = pair
    await stream.aclose()
    await stream.aclose()  # idempotent
    assert stream.socket.fileno() == -1
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"late")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await stream.wait_send_all_might_not_block()


@pytest.mark.parametrize("blocked_in", ["receive_some", "send_all"])
async def test_aclose_wakes_a_task_blocked_on_the_socket(
    pair: StreamAndPeer, blocked_in: str
) -> None:
    stream, _ = pair  # the peer never reads nor writes
    operation: Callable[[], Awaitable[object]] = (
        stream.receive_some
        if blocked_in == "receive_some"
        else lambda: stream.send_all(b"x" * MORE_THAN_THE_KERNEL_BUFFERS)
    )
    outcome: list[BaseException] = []

    async def blocked_task() -> None:
        try:
            await operation()
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_task)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()

    assert len(outcome) == 1


async def test_a_reader_fed_without_pause_yields_every_few_reads(pair: StreamAndPeer) -> None:
    stream, peer = pair
    peer.sendall(b"x" * (2 * YIELD_EVERY))  # with max_bytes=1 every receive finds data waiting
    reads_done = 0
    reads_seen_by_other_task: list[int] = []

    async def other_task() -> None:
        reads_seen_by_other_task.append(reads_done)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        for _ in range(2 * YIELD_EVERY):
            assert await stream.receive_some(1) == b"x"
            reads_done += 1

    # The other task runs at the first scheduling point: the YIELD_EVERY-th read. Trio may run
    # it just before the reader resumes or just after (the reader runs on to its next yield).
    # Never yielding would show 2 * YIELD_EVERY; yielding on every read, 0 or 1.
    assert reads_seen_by_other_task in ([YIELD_EVERY - 1], [2 * YIELD_EVERY - 1])


async def test_a_blocked_receive_is_cancelled_cleanly_and_the_stream_still_works(
    pair: StreamAndPeer, autojump_clock: trio.testing.MockClock
) -> None:
    stream, peer = pair
    start = trio.current_time()
    with trio.move_on_after(5) as scope:
        await stream.receive_some()
    assert scope.cancelled_caught
    assert trio.current_time() - start == 5

    peer.sendall(b"after the cancel")
    assert await stream.receive_some() == b"after the cancel"


async def test_ssl_streams_handshake_and_talk_over_it(
    ca: trustme.CA, two_streams: tuple[EagerSocketStream, EagerSocketStream]
) -> None:
    client, server = await tls_pair(ca, *two_streams)
    assert client.getpeercert() is not None

    await client.send_all(b"question")
    assert await server.receive_some() == b"question"
    await server.send_all(b"answer")
    assert await client.receive_some() == b"answer"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.aclose)
        assert await server.receive_some() == b""  # the client's close_notify
        await server.aclose()


async def test_open_tls_gives_a_no_delay_socket_under_the_ssl_stream(
    start_upstream: StartUpstream, ca_file: str
) -> None:
    # Issue 3: TCP_NODELAY on every TCP socket. trio set it when it connected; the bare socket
    # the proxy then uses must still have it (and be non-blocking, for EagerSocketStream).
    fake = await start_upstream()
    spec = parse_upstream(fake.spec)
    stream = await open_tls(spec, make_ssl_context(ca_file=ca_file))
    try:
        sock = stream.transport_stream.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert not sock.getblocking()
    finally:
        await trio.aclose_forcefully(stream)
