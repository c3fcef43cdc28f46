"""Fault injection at the upstream (issue 5 §4): whatever the upstream does, the client gets
SERVFAIL or the right answer within its deadline, the proxy keeps serving, and nothing is left
behind — no upstream connection, no task, no file descriptor.

One fake DoT upstream misbehaves in a given way, before or after the TLS handshake; then it
heals, and the next query must be answered. Every test ends by waiting (in virtual time) for the
proxy to return to the steady state it started in, and compares counts: upstream connections
(``Upstream.connections``, through the proxy's ``resolver``), trio tasks in the whole task
tree (the fake's included, so a connection the proxy forgot to close shows up as the fake's
handler still running), and this process's open file descriptors. The proxy and the fake run
in this process, on loopback, under virtual time (``clock``, tests/conftest.py).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import pytest
import trio
import trio.testing
import trustme

from dot_proxy.core.message import message_id
from dot_proxy.upstream.group import UpstreamGroup
from tests.clients import TcpClient, query
from tests.conftest import RunningProxy, StartProxy
from tests.fakes import (
    Behaviour,
    FakeUpstream,
    UpstreamConnection,
    answer_all,
    answer_for,
    answer_twice,
    close_mid_frame,
    garbage_after,
    hang,
)

TIMEOUT = 5.0  # the client's deadline (the proxy's default)
CONNECT_BUDGET = 0.4 * TIMEOUT  # TCP connect plus TLS handshake (Config.connect_timeout)
# "At once": waited on no timer. Virtual time moves only when every task waits on one.
AT_ONCE = 0.25
# A short upstream idle timeout, so the healed upstream's pooled connection closes soon and
# the proxy is back where it started.
UPSTREAM_IDLE = 2.0
GOOD = "192.0.2.1"  # what answer_for answers
LATE = "198.51.100.99"


# --- the faulty upstream -------------------------------------------------------------------------

RawFault = Callable[["Faulty", trio.SocketStream], Awaitable[None]]


class Faulty(FakeUpstream):
    """A fake that, while ``raw`` is set, does that to each TCP connection instead of TLS;
    otherwise it serves like any fake, with ``behaviour`` after the handshake."""

    def __init__(self, ca: trustme.CA, *, behaviour: Behaviour, raw: RawFault | None) -> None:
        super().__init__(ca, behaviour=behaviour)
        self.raw = raw

    async def _handle(self, tcp: trio.SocketStream) -> None:
        if self.raw is None:
            await super()._handle(tcp)
            return
        self.connections += 1
        try:
            await self.raw(self, tcp)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tcp)

    def heal(self) -> None:
        self.raw = None
        self.behaviour = answer_all


async def _client_hello(tcp: trio.SocketStream) -> None:
    # The proxy speaks first: wait for (the start of) its ClientHello.
    assert await tcp.receive_some(65536)


async def reset_in_handshake(_fake: Faulty, tcp: trio.SocketStream) -> None:
    """Take the ClientHello, then reset the connection (SO_LINGER 0: close sends RST)."""
    await _client_hello(tcp)
    tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def close_in_handshake(_fake: Faulty, tcp: trio.SocketStream) -> None:
    """Take the ClientHello, then close (FIN) without a word."""
    await _client_hello(tcp)


# RFC 8446 §6 / RFC 5246 §7.2: an alert record (type 21), fatal (2), handshake_failure (40).
HANDSHAKE_FAILURE_ALERT = bytes([21, 3, 3, 0, 2, 2, 40])


async def alert_in_handshake(_fake: Faulty, tcp: trio.SocketStream) -> None:
    """Answer the ClientHello with a fatal TLS alert, as a server that shares no cipher,
    version or certificate type with the client does."""
    await _client_hello(tcp)
    await tcp.send_all(HANDSHAKE_FAILURE_ALERT)


async def slow_handshake(fake: Faulty, tcp: trio.SocketStream) -> None:
    """Sit on the ClientHello past the client's deadline, then handshake after all."""
    await _client_hello(tcp)
    await trio.sleep(TIMEOUT + 1.0)
    await FakeUpstream._handle(fake, tcp)  # the proxy has gone: this fails, quietly


async def huge_prefix_then_stall(connection: UpstreamConnection) -> None:
    """Announce a 65,535-byte answer, send a little of it, then nothing (never closing)."""
    if await connection.receive_query() is None:
        return
    await connection.stream.send_all(b"\xff\xff" + b"\x00" * 100)
    await hang(connection)


async def unframed_http(connection: UpstreamConnection) -> None:
    """Answer like a web server: bytes that are not DNS and not even framed ("HT" reads as a
    length of 18,516), then wait."""
    if await connection.receive_query() is None:
        return
    await connection.stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await hang(connection)


async def noise_with_its_id(connection: UpstreamConnection) -> None:
    """Answer each query with a frame that has its ID and 40 bytes of noise: not an answer
    to its question, so it must be dropped and the query wait on."""
    while (wire := await connection.receive_query()) is not None:
        await connection.send(wire[:2] + b"\x81\x80" + bytes(range(7, 47)))


@dataclass(frozen=True)
class Fault:
    raw: RawFault | None = None
    behaviour: Behaviour = answer_all
    # When the client gets its SERVFAIL: "at once" (no timer), after the connect budget, or
    # at the query's deadline.
    when: str = "at once"


FAULTS = [
    pytest.param(Fault(raw=reset_in_handshake), id="reset-in-handshake"),
    pytest.param(Fault(raw=close_in_handshake), id="closed-in-handshake"),
    pytest.param(Fault(raw=alert_in_handshake), id="tls-alert"),
    pytest.param(Fault(raw=slow_handshake, when="connect budget"), id="handshake-too-slow"),
    pytest.param(Fault(behaviour=huge_prefix_then_stall, when="deadline"), id="65535-then-stall"),
    # The connection is retired and the query retried once on a fresh one, which fails alike.
    pytest.param(Fault(behaviour=close_mid_frame(times=100)), id="half-a-frame-then-close"),
    pytest.param(Fault(behaviour=garbage_after(1, b"junk")), id="garbage-frame"),
    pytest.param(Fault(behaviour=unframed_http, when="deadline"), id="garbage-unframed"),
    pytest.param(Fault(behaviour=noise_with_its_id, when="deadline"), id="garbage-with-its-id"),
]


# --- clients -------------------------------------------------------------------------------------


class Client:
    """One client socket, UDP or TCP, kept for several queries (so a stray answer shows)."""

    def __init__(self, transport: str, port: int) -> None:
        self.transport = transport
        self.port = port
        self._udp: trio.socket.SocketType | None = None
        self._tcp: TcpClient | None = None

    async def open(self) -> None:
        if self.transport == "udp":
            self._udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await self._udp.connect(("127.0.0.1", self.port))
        else:
            self._tcp = await TcpClient.connect(self.port)

    async def send(self, request: dns.message.Message) -> None:
        if self._udp is not None:
            await self._udp.send(request.to_wire())
        else:
            assert self._tcp is not None
            await self._tcp.send(request.to_wire())

    async def receive(self) -> dns.message.Message:
        if self._udp is not None:
            data = await self._udp.recv(65535)
        else:
            assert self._tcp is not None
            reply = await self._tcp.receive()
            assert reply is not None, "the proxy closed the client connection"
            data = reply
        return dns.message.from_wire(data)

    async def ask(self, request: dns.message.Message) -> tuple[dns.message.Message, float]:
        """The reply to ``request`` and how long it took (virtual seconds)."""
        start = trio.current_time()
        await self.send(request)
        with trio.fail_after(TIMEOUT + 1.0):  # virtual: the deadline is the proxy's promise
            answer = await self.receive()
        return answer, trio.current_time() - start

    async def nothing_more(self, within: float = 2.0) -> None:
        with trio.move_on_after(within) as waited:
            stray = await self.receive()
        assert waited.cancelled_caught, f"a stray answer came: {stray}"

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            await self._tcp.aclose()


@asynccontextmanager
async def client(transport: str, port: int) -> AsyncIterator[Client]:
    opened = Client(transport, port)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.aclose()


TRANSPORTS = ["udp", "tcp"]


# --- steady state --------------------------------------------------------------------------------


def task_names() -> Counter[str]:
    """The name of every task in the run's task tree, counted."""
    names: Counter[str] = Counter()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        assert task is not None
        names[task.name] += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return names


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Steady:
    """What a proxy idle with no upstream connection looks like: compare it afterwards."""

    resolver: UpstreamGroup
    tasks: Counter[str]
    fds: int

    @classmethod
    async def now(cls, resolver: UpstreamGroup) -> Steady:
        await trio.sleep(0.1)  # let the start-up settle
        assert not resolver.upstreams[0].connections
        return cls(resolver, task_names(), open_fds())

    def _reached(self) -> bool:
        return (
            not any(upstream.connections for upstream in self.resolver.upstreams)
            and not any(health.down for health in self.resolver.health)
            and task_names() == self.tasks
            and open_fds() == self.fds
        )

    async def back(self) -> None:
        """Wait (virtual time) until the proxy is back to this state, or fail saying how not."""
        with trio.move_on_after(30.0):
            while not self._reached():  # noqa: ASYNC110 - counts have no event to wait on
                await trio.sleep(0.25)
        connections = [len(upstream.connections) for upstream in self.resolver.upstreams]
        assert connections == [0] * len(connections), "upstream connections left open"
        assert not any(health.down for health in self.resolver.health)
        now = task_names()
        assert now == self.tasks, f"tasks left: {now - self.tasks}, gone: {self.tasks - now}"
        assert open_fds() == self.fds, "file descriptors left open"


@dataclass
class Setup:
    fake: Faulty
    proxy: RunningProxy
    resolver: UpstreamGroup
    steady: Steady


@pytest.fixture
async def start_faulty(
    ca: trustme.CA,
    nursery: trio.Nursery,
    start_proxy: StartProxy,
) -> Callable[[Fault], Awaitable[Setup]]:
    async def start(fault: Fault) -> Setup:
        fake = Faulty(ca, behaviour=fault.behaviour, raw=fault.raw)
        await nursery.start(fake.serve)
        proxy = await start_proxy([fake], timeout=TIMEOUT, upstream_idle_timeout=UPSTREAM_IDLE)
        resolver = proxy.group
        return Setup(fake, proxy, resolver, await Steady.now(resolver))

    return start


def _check_good(answer: dns.message.Message, request: dns.message.Message) -> None:
    assert answer.id == request.id
    assert answer.question == request.question
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer[0][0].address == GOOD


# --- each fault: SERVFAIL within the deadline, then served again, nothing left ----------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_faulty_upstream_costs_one_servfail_and_leaves_nothing_behind(
    clock: trio.testing.MockClock,
    start_faulty: Callable[[Fault], Awaitable[Setup]],
    fault: Fault,
    transport: str,
) -> None:
    setup = await start_faulty(fault)
    async with client(transport, setup.proxy.port) as asker:
        request = query("fault.faults.test.", "A")
        answer, took = await asker.ask(request)
        assert answer.id == request.id
        assert answer.question == request.question
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert answer.answer == []
        if fault.when == "at once":
            assert took < AT_ONCE
        elif fault.when == "connect budget":
            assert took == pytest.approx(CONNECT_BUDGET, abs=0.05)
        else:
            assert took == pytest.approx(TIMEOUT, abs=0.05)
        assert setup.fake.connections >= 1  # the fault was met, not skipped

        # The upstream heals: the proxy serves the next query from it, within the deadline.
        setup.fake.heal()
        good = query("good.faults.test.", "A")
        answer, took = await asker.ask(good)
        _check_good(answer, good)
        assert took < TIMEOUT
        await asker.nothing_more()
    await setup.steady.back()


# --- late, duplicate and truncated answers -------------------------------------------------------


class LateFirst:
    """Answer the first query ``delay`` seconds late with the ``LATE`` address; answer every
    later one at once. Records the wire ID of every query."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.wire_ids: list[int] = []
        self.late_sent = False

    async def __call__(self, connection: UpstreamConnection) -> None:
        lock = trio.Lock()

        async def late(wire: bytes) -> None:
            await trio.sleep(self.delay)
            async with lock:
                await connection.send(answer_for(wire, address=LATE))
            self.late_sent = True

        async with trio.open_nursery() as nursery:
            while (wire := await connection.receive_query()) is not None:
                self.wire_ids.append(message_id(wire))
                if len(self.wire_ids) == 1:
                    nursery.start_soon(late, wire)
                else:
                    async with lock:
                        await connection.send(answer_for(wire))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_after_the_deadline_is_dropped_not_given_to_the_next_query(
    clock: trio.testing.MockClock,
    start_faulty: Callable[[Fault], Awaitable[Setup]],
    transport: str,
) -> None:
    # The same client asks the same question under the same ID again right after its
    # deadline; the late answer to the first (marked LATE) comes while the second is on the
    # same upstream connection. Had the proxy reused the wire ID, the late answer would match
    # the second query and reach the client.
    late = LateFirst(TIMEOUT + 0.5)
    setup = await start_faulty(Fault(behaviour=late))
    async with client(transport, setup.proxy.port) as asker:
        request = query("same.faults.test.", "A")
        request.id = 4242
        answer, took = await asker.ask(request)
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert took == pytest.approx(TIMEOUT, abs=0.05)
        assert not late.late_sent

        answer, took = await asker.ask(request)  # the same question, the same ID
        _check_good(answer, request)
        assert took < AT_ONCE
        # RFC 7766 §6.2.1: the first query's wire ID stays reserved while it is outstanding.
        assert late.wire_ids[1] != late.wire_ids[0]
        await trio.sleep(1.0)
        assert late.late_sent  # ... and it has come, and been dropped

        answer, _ = await asker.ask(request)  # once more, after the late answer
        _check_good(answer, request)
        await asker.nothing_more()  # the late answer never reaches the client
    assert setup.fake.handshakes == 1  # one connection throughout, kept healthy
    await setup.steady.back()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_answer_twice_reaches_the_client_once(
    clock: trio.testing.MockClock,
    start_faulty: Callable[[Fault], Awaitable[Setup]],
    transport: str,
) -> None:
    setup = await start_faulty(Fault(behaviour=answer_twice))
    async with client(transport, setup.proxy.port) as asker:
        for number in range(3):
            request = query(f"twice{number}.faults.test.", "A")
            answer, took = await asker.ask(request)
            _check_good(answer, request)
            assert took < AT_ONCE
        await asker.nothing_more()
    assert setup.fake.handshakes == 1
    await setup.steady.back()


def truncated(query_wire: bytes) -> bytes:
    """The upstream's answer with TC set and no records (RFC 1035 §4.1.1)."""
    response = dns.message.make_response(dns.message.from_wire(query_wire))
    response.flags |= dns.flags.TC
    wire: bytes = response.to_wire()
    return wire


async def answer_truncated(connection: UpstreamConnection) -> None:
    while (wire := await connection.receive_query()) is not None:
        await connection.send(truncated(wire))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_with_tc_set_is_passed_on_as_the_upstreams_answer(
    clock: trio.testing.MockClock,
    start_faulty: Callable[[Fault], Awaitable[Setup]],
    transport: str,
) -> None:
    # TC is part of the upstream's answer, and the proxy passes answers on, not judges them:
    # it neither retries (it already asked over TCP: the upstream has nothing bigger to give)
    # nor clears the bit. Over UDP the client then does what TC asks (RFC 1035 §4.2.1,
    # RFC 7766 §5): it retries over TCP, and gets the same TC answer there, which tells it the
    # upstream could not give the whole answer. No SERVFAIL: the upstream did answer.
    setup = await start_faulty(Fault(behaviour=answer_truncated))
    async with client(transport, setup.proxy.port) as asker:
        request = query("big.faults.test.", "TXT")
        answer, took = await asker.ask(request)
        assert answer.id == request.id
        assert answer.question == request.question
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.flags & dns.flags.TC
        assert answer.answer == []
        assert took < AT_ONCE
        await asker.nothing_more()
    assert setup.proxy.stats.servfail == 0
    await setup.steady.back()


async def test_the_steady_state_check_sees_a_connection_left_open(
    clock: trio.testing.MockClock,
    start_faulty: Callable[[Fault], Awaitable[Setup]],
) -> None:
    # The check itself must be able to fail: a client TCP connection still open is tasks
    # and descriptors more than the steady state (or, once the proxy closed it as idle, one
    # descriptor: the client's).
    setup = await start_faulty(Fault())
    left_open = await TcpClient.connect(setup.proxy.port)
    request = query("open.faults.test.", "A")
    await left_open.send(request.to_wire())
    assert await left_open.receive() is not None
    with pytest.raises(AssertionError, match="left"):
        await setup.steady.back()
    await left_open.aclose()
    await setup.steady.back()
