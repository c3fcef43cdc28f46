"""Limits that keep a misbehaving client from costing unbounded memory or slots (issue 5 §2).

RFC 7766 §6.2.3 lets a server limit and close client connections; RFC 9210 asks it to keep
serving pipelined queries. What is already covered elsewhere is not repeated here: a UDP query
over ``--max-in-flight`` dropped and counted (tests/test_server_lifecycle.py), a half-sent frame
closed after the idle time while others are served (tests/test_server_tcp.py). All on virtual
time (the ``clock`` fixture): timings are exact and nothing waits on the wall clock.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy.serve.tcp import MAX_TCP_CLIENT_PIPELINE
from tests.clients import TcpClient, query, receive_until_closed, tcp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    UpstreamConnection,
    answer_for,
    answering,
    eventually,
    hang,
    txt_answer_for,
)

TIMEOUT = 5.0  # the proxy's deadline


def tasks_named(name: str) -> list[trio.lowlevel.Task]:
    """Every task in this run whose name (module-qualified function name) ends in ``name``."""
    found = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task.name.endswith(name):
            found.append(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


def _requests(count: int, tag: str = "q") -> list[dns.message.Message]:
    requests = []
    for number in range(count):
        request = query(f"{tag}{number}.limits.test.", "A")
        request.id = 1000 + number
        requests.append(request)
    return requests


class Paced:
    """Answer each query ``delay`` seconds after it arrived; count how many wait at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.outstanding = 0
        self.peak = 0

    async def __call__(self, connection: UpstreamConnection) -> None:
        lock = trio.Lock()

        async def answer_later(wire: bytes) -> None:
            await trio.sleep(self.delay)
            try:
                async with lock:
                    await connection.send(answer_for(wire))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.outstanding -= 1

        async with trio.open_nursery() as nursery:
            while (wire := await connection.receive_query()) is not None:
                self.outstanding += 1
                self.peak = max(self.peak, self.outstanding)
                nursery.start_soon(answer_later, wire)


# --- --max-in-flight over TCP --------------------------------------------------------------------


@pytest.mark.parametrize("idle", [2.0, 10.0])
async def test_a_tcp_client_pipelining_past_max_in_flight_waits_and_gets_every_answer(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    idle: float,
) -> None:
    # Over UDP the query past the limit is dropped (the client retries); over TCP the client's
    # next frame waits for a slot instead, and is answered once one frees (issue 5 §2). The
    # wait is not idleness: with ten queries two at a time, 0.8 s each, the client waits 4 s,
    # longer than an idle timeout of 2 s, and must still get every answer.
    paced = Paced(0.8)
    fake = await start_upstream(paced)
    proxy = await start_proxy([fake], max_in_flight=2, tcp_idle_timeout=idle)
    requests = _requests(10)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        start = trio.current_time()
        await client.send(*(request.to_wire() for request in requests))
        answers = {}
        with trio.fail_after(60):  # virtual time: a lost query fails the test, not hangs it
            for _ in requests:
                reply = await client.receive()
                assert reply is not None, f"closed after {len(answers)} answers"
                answer = dns.message.from_wire(reply)
                answers[answer.id] = answer
        assert trio.current_time() - start == pytest.approx(5 * 0.8, abs=0.05)
        for request in requests:
            assert answers[request.id].rcode() == dns.rcode.NOERROR
            assert answers[request.id].question == request.question
        # Still open and serving afterwards.
        more = query("after.limits.test.", "A")
        await client.send(more.to_wire())
        reply = await client.receive()
        assert reply is not None
        assert dns.message.from_wire(reply).id == more.id
    assert paced.peak == 2  # never more than the limit at the upstream at once
    assert len(fake.queries) == 11
    assert proxy.stats.dropped_busy == 0  # TCP frames wait; only UDP is dropped


# --- --max-tcp-clients ---------------------------------------------------------------------------


async def test_a_connection_past_max_tcp_clients_waits_until_one_closes(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], max_tcp_clients=2, tcp_idle_timeout=60.0)
    first = await TcpClient.connect(proxy.port)
    second = await TcpClient.connect(proxy.port)
    for client in (first, second):
        request = query("served.limits.test.", "A")
        await client.send(request.to_wire())
        reply = await client.receive()
        assert reply is not None
        assert dns.message.from_wire(reply).id == request.id
    # The third connects (the kernel's backlog completes the handshake) but is not accepted:
    # its query sits in the kernel, unread, however long it waits.
    third = await TcpClient.connect(proxy.port)
    waiting = query("third.limits.test.", "A")
    await third.send(waiting.to_wire())
    with trio.move_on_after(30.0) as waited:
        await third.receive()
    assert waited.cancelled_caught, "a connection past the limit was served"
    assert len(fake.queries) == 2
    # One of the first two goes: the third is accepted and its query answered at once.
    await first.aclose()
    start = trio.current_time()
    reply = await third.receive()
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.id == waiting.id
    assert answer.rcode() == dns.rcode.NOERROR
    assert trio.current_time() - start < 0.5
    # The limit still holds: a fourth waits behind the two open ones.
    fourth = await TcpClient.connect(proxy.port)
    await fourth.send(query("fourth.limits.test.", "A").to_wire())
    with trio.move_on_after(30.0) as waited:
        await fourth.receive()
    assert waited.cancelled_caught
    await second.aclose()
    assert await fourth.receive() is not None
    for client in (third, fourth):
        await client.aclose()


async def test_idle_connections_closed_by_the_proxy_free_their_slots(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # Clients that connect and say nothing hold a slot only for the idle time.
    fake = await start_upstream()
    idle = 10.0
    proxy = await start_proxy([fake], max_tcp_clients=2, tcp_idle_timeout=idle)
    silent = [await TcpClient.connect(proxy.port) for _ in range(2)]
    start = trio.current_time()
    request = query("patient.limits.test.", "A")
    reply = await tcp_exchange(proxy.port, request.to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).id == request.id
    assert trio.current_time() - start == pytest.approx(idle, abs=0.05)
    for client in silent:
        assert await receive_until_closed(client) == []
        await client.aclose()


# --- the per-connection pipeline -----------------------------------------------------------------


async def test_a_client_pipelining_1000_queries_holds_at_most_the_pipeline_bound(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream(hang)
    proxy = await start_proxy([fake], timeout=TIMEOUT, tcp_idle_timeout=60.0)
    baseline = len(tasks_named("_answer_frame"))
    assert baseline == 0
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        requests = _requests(1000)
        await client.send(*(request.to_wire() for request in requests))
        await eventually(lambda: len(fake.queries) >= MAX_TCP_CLIENT_PIPELINE)
        # Let everything that is coming arrive: the rest waits unread, not as tasks (one
        # listeners._answer_frame task per query being answered on a client connection).
        await trio.sleep(TIMEOUT / 2)
        assert len(tasks_named("_answer_frame")) == MAX_TCP_CLIENT_PIPELINE
        assert len(fake.queries) == MAX_TCP_CLIENT_PIPELINE
        # At the deadline those get SERVFAIL, and the next ones take their places.
        for _ in range(MAX_TCP_CLIENT_PIPELINE):
            reply = await client.receive()
            assert reply is not None
            assert dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
        await eventually(lambda: len(fake.queries) >= 2 * MAX_TCP_CLIENT_PIPELINE)
        await trio.sleep(TIMEOUT / 2)
        assert len(tasks_named("_answer_frame")) == MAX_TCP_CLIENT_PIPELINE
        assert len(fake.queries) == 2 * MAX_TCP_CLIENT_PIPELINE
    # The client went away: what it had in flight ends by its deadline, and nothing stays.
    await trio.sleep(TIMEOUT)
    assert tasks_named("_answer_frame") == []
    assert tasks_named("_serve_tcp_client") == []
    assert proxy.stats.dropped_busy == 0


# --- a client that does not read its answers -----------------------------------------------------

BIG = 32_000  # bytes per answer: a few hundred fill the kernel's buffers


def same_big_answer(size: int) -> Callable[[bytes], bytes]:
    """Answers of ``size`` bytes, built once per question and reused with each query's ID
    (dnspython is too slow to build thousands of them)."""
    built: dict[bytes, bytes] = {}

    def make(wire: bytes) -> bytes:
        key = dns.message.from_wire(wire).question[0].to_text().encode()
        if key not in built:
            built[key] = txt_answer_for(wire, size)
        return wire[:2] + built[key][2:]

    return make


async def _non_reader(port: int) -> TcpClient:
    """A client with a tiny receive buffer, so that what it does not read backs up at once."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return TcpClient(trio.SocketStream(sock))


def _kernel_send_buffer_max() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def test_a_client_that_does_not_read_its_answers_is_not_read_from_either(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # Answers the client does not take wait in the kernel, then in the proxy. Were the proxy
    # to go on reading the client's queries meanwhile, they would pile up without bound
    # (issue 5 §2: memory stays bounded whatever arrives); it stops reading instead, as
    # TCP's own flow control would, and resumes when the client reads.
    fake = await start_upstream(answering(same_big_answer(BIG)))
    proxy = await start_proxy([fake], tcp_idle_timeout=60.0)
    count = 600  # 19 MB of answers, far more than the kernel holds for one connection
    requests = []
    for number in range(count):
        request = query("big.limits.test.", "TXT")
        request.id = number
        requests.append(request)
    client = await _non_reader(proxy.port)
    async with client.stream:
        await client.send(*(request.to_wire() for request in requests))
        await trio.sleep(5.0)  # long enough for everything that will move to have moved
        # What the kernel can hold (the proxy's send buffer at its largest; the client's is
        # tiny), plus the answers of the queries in flight when it filled, plus one burst.
        bound = _kernel_send_buffer_max() // BIG + 2 * MAX_TCP_CLIENT_PIPELINE
        assert len(fake.queries) <= bound < count
        # Nothing was lost: once the client reads, every answer comes.
        ids = set()
        with trio.fail_after(60):
            for _ in requests:
                reply = await client.receive()
                assert reply is not None
                assert len(reply) >= BIG - 11  # less the OPT record the proxy added to pad
                ids.add((reply[0] << 8) | reply[1])
        assert ids == set(range(count))
    assert len(fake.queries) == count


async def test_a_client_that_does_not_read_does_not_hold_its_slot_forever(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # With --max-tcp-clients 1, one client that asks and never reads must not lock every
    # other TCP client out: its connection is idle once its queries are answered, and what
    # it does not read gets one more idle period to go, then the connection is closed.
    fake = await start_upstream(answering(same_big_answer(BIG)))
    idle = 10.0
    proxy = await start_proxy([fake], max_tcp_clients=1, tcp_idle_timeout=idle)
    hog = await _non_reader(proxy.port)
    async with hog.stream:
        requests = [query("big.limits.test.", "TXT") for _ in range(300)]
        await hog.send(*(request.to_wire() for request in requests))
        start = trio.current_time()
        request = query("next.limits.test.", "A")
        with trio.fail_after(2 * idle + TIMEOUT):
            reply = await tcp_exchange(proxy.port, request.to_wire())
        assert reply is not None
        assert dns.message.from_wire(reply).id == request.id
        assert trio.current_time() - start >= idle  # the hog had its idle time first


# --- --tcp-idle-timeout --------------------------------------------------------------------------

IDLE = 10.0


async def _trickle(client: TcpClient, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the proxy closes."""
    for byte in data:
        await trio.sleep(every)
        try:
            await client.stream.send_all(bytes([byte]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def test_a_client_trickling_bytes_without_completing_a_frame_is_closed(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # Slowloris, patiently: one byte every (idle - 1) s keeps bytes arriving, but no frame is
    # ever whole. Idle counts from the last whole query, not from the last byte.
    fake = await start_upstream()
    proxy = await start_proxy([fake], tcp_idle_timeout=IDLE)
    wire = query("trickle.limits.test.", "A").to_wire()
    client = await TcpClient.connect(proxy.port)
    async with client.stream, trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(_trickle, client, len(wire).to_bytes(2, "big") + wire, IDLE - 1)
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start == pytest.approx(IDLE, abs=0.05)
        nursery.cancel_scope.cancel()
    assert fake.queries == []


async def test_trickling_after_a_query_is_closed_an_idle_time_after_that_query(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fake = await start_upstream()
    proxy = await start_proxy([fake], tcp_idle_timeout=IDLE)
    client = await TcpClient.connect(proxy.port)
    async with client.stream, trio.open_nursery() as nursery:
        await trio.sleep(IDLE / 2)
        request = query("first.limits.test.", "A")
        await client.send(request.to_wire())
        reply = await client.receive()
        assert reply is not None
        assert dns.message.from_wire(reply).id == request.id
        answered = trio.current_time()
        wire = query("second.limits.test.", "A").to_wire()
        nursery.start_soon(_trickle, client, len(wire).to_bytes(2, "big") + wire, IDLE - 1)
        assert await receive_until_closed(client) == []
        assert trio.current_time() - answered == pytest.approx(IDLE, abs=0.05)
        nursery.cancel_scope.cancel()
    assert len(fake.queries) == 1


async def test_whole_queries_keep_a_connection_open_past_the_idle_time(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # The other side of the rule: a client asking every (idle - 1) s is never cut off.
    fake = await start_upstream()
    proxy = await start_proxy([fake], tcp_idle_timeout=IDLE)
    client = await TcpClient.connect(proxy.port)
    async with client.stream:
        for number in range(4):
            await trio.sleep(IDLE - 1)
            request = query(f"k{number}.limits.test.", "A")
            await client.send(request.to_wire())
            reply = await client.receive()
            assert reply is not None
            assert dns.message.from_wire(reply).id == request.id
        start = trio.current_time()
        assert await receive_until_closed(client) == []
        assert trio.current_time() - start == pytest.approx(IDLE, abs=0.05)
    assert len(fake.queries) == 4
