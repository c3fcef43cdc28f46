"""In-process fakes: a DoT upstream served with trio and a trustme certificate.

The fake's behaviour is a coroutine per connection, so each test says exactly what the upstream
does: answer, hang, close mid-frame, send a wrong ID, and so on.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.rrset
import pytest
import trio
import trio.testing
import trustme

from dot_proxy.config import Config, PlainSpec, UpstreamSpec, parse_upstream
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.core.message import parse_query
from dot_proxy.errors import UpstreamConnectError
from dot_proxy.testing.realdns import bound_pair
from dot_proxy.upstream.pool import Upstream, open_upstreams
from dot_proxy.upstream.trio_private import RoundSavingSender

AUTH_NAME = "dns.test"

Behaviour = Callable[["UpstreamConnection"], Awaitable[None]]


async def tls_pair(
    ca: trustme.CA, client_transport: trio.abc.Stream, server_transport: trio.abc.Stream
) -> tuple[trio.SSLStream[Any], trio.SSLStream[Any]]:
    """A client and a server SSLStream over the two transports, handshake done.

    The server presents a certificate for ``AUTH_NAME`` from ``ca``; the client trusts ``ca``.
    """
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(AUTH_NAME).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client = trio.SSLStream(client_transport, client_context, server_hostname=AUTH_NAME)
    server = trio.SSLStream(server_transport, server_context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        await server.do_handshake()
    return client, server


def answer_for(query_wire: bytes, *, address: str = "192.0.2.1", ttl: int = 300) -> bytes:
    """A NOERROR answer to ``query_wire`` with one A record (or none for other types)."""
    query = dns.message.from_wire(query_wire)
    response = dns.message.make_response(query)
    question = query.question[0]
    if question.rdtype == 1:
        response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", "A", address))
    return response.to_wire()


@dataclass
class UpstreamConnection:
    """One accepted TLS connection at the fake, with helpers for behaviours."""

    stream: trio.SSLStream[trio.SocketStream]
    upstream: FakeUpstream
    decoder: FrameDecoder = field(default_factory=FrameDecoder)

    async def receive_query(self) -> bytes | None:
        """The next query, or None at EOF."""
        while True:
            message = self.decoder.next_message()
            if message is not NEED_DATA:
                self.upstream.queries.append(message)
                self.upstream.query_arrived.unpark_all()
                return message
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.upstream.received_bytes.append(bytes(data))
            self.decoder.feed(data)

    async def send(self, message: bytes) -> None:
        await self.stream.send_all(frame(message))


async def answer_all(connection: UpstreamConnection) -> None:
    """The well-behaved upstream: answer every query at once, in order."""
    while (query := await connection.receive_query()) is not None:
        await connection.send(answer_for(query))


class FakeUpstream:
    """A DoT server on 127.0.0.1, port chosen by the kernel, certificate from ``ca``."""

    def __init__(
        self,
        ca: trustme.CA,
        *,
        behaviour: Behaviour = answer_all,
        names: tuple[str, ...] = (AUTH_NAME, "127.0.0.1"),
    ) -> None:
        self.behaviour = behaviour
        self.queries: list[bytes] = []
        self.received_bytes: list[bytes] = []
        self.connections = 0
        self.handshakes = 0
        self.session_reused: list[bool] = []  # per handshake: whether it resumed a session
        self.port = 0
        self.query_arrived = trio.lowlevel.ParkingLot()
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert = ca.issue_cert(*names)
        self.cert.configure_cert(self._context)

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}#{AUTH_NAME}"

    @property
    def leaf_der(self) -> bytes:
        """The DER of the certificate this fake presents (to compute its SPKI pin)."""
        return ssl.PEM_cert_to_DER_cert(self.cert.cert_chain_pems[0].bytes().decode())

    async def wait_for_queries(self, count: int) -> None:
        """Return once the fake has received at least ``count`` queries in all."""
        while len(self.queries) < count:
            await self.query_arrived.park()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream = trio.SSLStream(tcp, self._context, server_side=True, https_compatible=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(tcp)
            return
        self.handshakes += 1
        self.session_reused.append(stream.session_reused)
        try:
            await self.behaviour(UpstreamConnection(stream, self))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


# --- Behaviours and answers for the server tests (tests/test_server_*.py) -----------------------


def txt_answer_for(query_wire: bytes, size: int) -> bytes:
    """A NOERROR answer to ``query_wire`` made of TXT records, exactly ``size`` bytes long
    when that is at least 14 bytes more than the empty answer (and no more than 65,535)."""
    query = dns.message.from_wire(query_wire)
    # pad=0: no RFC 8467 response padding even to a padded query, so the size is exact.
    response = dns.message.make_response(query, pad=0)
    room = size - len(response.to_wire(max_size=65535))
    texts: list[str] = []
    while room >= 14:
        # A compressed owner, type, class, TTL, rdlength and the string's length byte: 13.
        length = min(255, room - 13)
        if 0 < room - 13 - length < 14:
            length = room - 13 - 14  # leave room for one more record: the size is then exact
        texts.append('"' + (f"{len(texts):04d}" + "x" * 255)[:length] + '"')
        room -= 13 + length
    if texts:
        name = query.question[0].name
        response.answer = [dns.rrset.from_text_list(name, 300, "IN", "TXT", texts)]
    wire: bytes = response.to_wire(max_size=65535)
    return wire


def answering(make: Callable[[bytes], bytes]) -> Behaviour:
    """A behaviour that answers every query at once with ``make(query)``."""

    async def behaviour(connection: UpstreamConnection) -> None:
        while (query := await connection.receive_query()) is not None:
            await connection.send(make(query))

    return behaviour


async def hang(connection: UpstreamConnection) -> None:
    """Read queries and never answer them."""
    while await connection.receive_query() is not None:
        pass


def answer_after(delay: float, make: Callable[[bytes], bytes] = answer_for) -> Behaviour:
    """Answer each query ``delay`` seconds after it arrived, each on its own timer."""

    async def behaviour(connection: UpstreamConnection) -> None:
        lock = trio.Lock()  # one SSLStream, many answering tasks: one send_all at a time

        async def answer_later(query: bytes) -> None:
            await trio.sleep(delay)
            try:
                async with lock:
                    await connection.send(make(query))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            while (query := await connection.receive_query()) is not None:
                nursery.start_soon(answer_later, query)

    return behaviour


def answer_in_reverse(batch: int) -> Behaviour:
    """Collect ``batch`` queries, then answer them last first (RFC 7766 §7 allows any order)."""

    async def behaviour(connection: UpstreamConnection) -> None:
        while True:
            queries: list[bytes] = []
            while len(queries) < batch:
                query = await connection.receive_query()
                if query is None:
                    return
                queries.append(query)
            await connection.stream.send_all(
                b"".join(frame(answer_for(query)) for query in reversed(queries))
            )

    return behaviour


def close_mid_frame(*, times: int) -> Behaviour:
    """On the first ``times`` connections, send half of the first answer and close; answer
    normally on later ones."""
    cut = 0

    async def behaviour(connection: UpstreamConnection) -> None:
        nonlocal cut
        if cut >= times:
            await answer_all(connection)
            return
        cut += 1
        query = await connection.receive_query()
        if query is not None:
            framed = frame(answer_for(query))
            await connection.stream.send_all(framed[: len(framed) // 2])

    return behaviour


def spoiled_first(spoil: Callable[[bytes], bytes], *, then_answer: bool) -> Behaviour:
    """Send ``spoil(query)`` first; then the right answer, or nothing (``then_answer=False``)."""

    async def behaviour(connection: UpstreamConnection) -> None:
        while (query := await connection.receive_query()) is not None:
            await connection.send(spoil(query))
            if then_answer:
                await connection.send(answer_for(query))

    return behaviour


def answer_anything(query_wire: bytes) -> bytes:
    """An answer to any query the proxy passes on, even one dnspython cannot read: the
    query echoed with QR set and SERVFAIL, when ``answer_for`` fails."""
    try:
        return answer_for(query_wire)
    except Exception:
        flags = bytes([query_wire[2] | 0x80, (query_wire[3] & 0xF0) | 2])
        return query_wire[:2] + flags + query_wire[4:]


# --- Behaviours for the upstream pool tests (tests/test_upstream_*.py) --------------------------


class PerConnection:
    """The n-th connection gets the n-th behaviour; later ones get ``then``.

    ``ended`` holds the (trio) time at which each connection's behaviour returned: for
    ``answer_all`` that is when the client closed the connection.
    """

    def __init__(self, *behaviours: Behaviour, then: Behaviour = answer_all) -> None:
        self.behaviours = behaviours
        self.then = then
        self.started = 0
        self.ended: list[float] = []

    async def __call__(self, connection: UpstreamConnection) -> None:
        index = self.started
        self.started += 1
        behaviour = self.behaviours[index] if index < len(self.behaviours) else self.then
        await behaviour(connection)
        self.ended.append(trio.current_time())


class Held:
    """Keep every query unanswered until the test releases it with :meth:`release`."""

    def __init__(self) -> None:
        self.held: list[tuple[UpstreamConnection, bytes]] = []

    async def __call__(self, connection: UpstreamConnection) -> None:
        while (query := await connection.receive_query()) is not None:
            self.held.append((connection, query))

    async def release(self, count: int | None = None) -> None:
        """Answer the ``count`` oldest held queries (all when None), oldest first."""
        count = len(self.held) if count is None else count
        batch, self.held = self.held[:count], self.held[count:]
        for connection, query in batch:
            await connection.send(answer_for(query))


def answer_then_hang(count: int) -> Behaviour:
    """Answer ``count`` queries, then go stale: read the rest, never answer, never close."""

    async def behaviour(connection: UpstreamConnection) -> None:
        for _ in range(count):
            query = await connection.receive_query()
            if query is None:
                return
            await connection.send(answer_for(query))
        await hang(connection)

    return behaviour


def answer_then_close(count: int) -> Behaviour:
    """Answer ``count`` queries, then close the connection."""

    async def behaviour(connection: UpstreamConnection) -> None:
        for _ in range(count):
            query = await connection.receive_query()
            if query is None:
                return
            await connection.send(answer_for(query))

    return behaviour


def close_after(count: int) -> Behaviour:
    """Read ``count`` queries without answering any, then close the connection."""

    async def behaviour(connection: UpstreamConnection) -> None:
        for _ in range(count):
            if await connection.receive_query() is None:
                return

    return behaviour


def garbage_after(count: int, garbage: bytes = b"junk") -> Behaviour:
    """Read ``count`` queries, then send ``garbage`` in a frame of its own and keep reading."""

    async def behaviour(connection: UpstreamConnection) -> None:
        for _ in range(count):
            if await connection.receive_query() is None:
                return
        await connection.send(garbage)
        await hang(connection)

    return behaviour


async def answer_twice(connection: UpstreamConnection) -> None:
    """Answer every query twice (a duplicate the client must drop)."""
    while (query := await connection.receive_query()) is not None:
        await connection.send(answer_for(query))
        await connection.send(answer_for(query))


# --- A cleartext DNS server (the plain: transport, tests/test_plain.py, tests/test_split_dns.py)


Address = tuple[str, int]
UdpBehaviour = Callable[["FakePlainServer", bytes, Address], Awaitable[None]]
TcpBehaviour = Callable[["FakePlainServer", trio.SocketStream], Awaitable[None]]


async def answer_udp(server: FakePlainServer, query: bytes, source: Address) -> None:
    await server.udp.sendto(answer_for(query), source)


async def truncate(server: FakePlainServer, query: bytes, source: Address) -> None:
    """Answer over UDP with TC set and no records: ask again over TCP."""
    response = dns.message.make_response(dns.message.from_wire(query))
    response.flags |= dns.flags.TC
    await server.udp.sendto(response.to_wire(), source)


async def answer_tcp(server: FakePlainServer, stream: trio.SocketStream) -> None:
    decoder = FrameDecoder()
    while data := await stream.receive_some(65536):
        decoder.feed(data)
        while (query := decoder.next_message()) is not NEED_DATA:
            server.tcp_queries.append(query)
            await stream.send_all(frame(answer_for(query)))


class FakePlainServer:
    """A cleartext DNS server on 127.0.0.1, UDP and TCP on one kernel-chosen port."""

    def __init__(self, udp: UdpBehaviour = answer_udp, tcp: TcpBehaviour = answer_tcp) -> None:
        self.udp_behaviour = udp
        self.tcp_behaviour = tcp
        self.udp_queries: list[tuple[bytes, Address]] = []
        self.tcp_queries: list[bytes] = []
        self.udp: trio.socket.SocketType  # bound in serve()
        self.port = 0

    @property
    def spec(self) -> PlainSpec:
        return PlainSpec("127.0.0.1", self.port)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        udp, listening, self.port = bound_pair()
        self.udp = trio.socket.from_stdlib_socket(udp)
        tcp = trio.socket.from_stdlib_socket(listening)
        tcp.listen(16)
        task_status.started(self.port)
        with self.udp, tcp:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp)
                listener = trio.SocketListener(tcp)
                nursery.start_soon(trio.serve_listeners, self._serve_tcp, [listener])

    async def _serve_udp(self) -> None:
        while True:
            data, source = await self.udp.recvfrom(65536)
            self.udp_queries.append((data, source))
            await self.udp_behaviour(self, data, source)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await self.tcp_behaviour(self, stream)


# --- Driving the upstream pool directly (tests/test_upstream_*.py) ------------------------------


def open_pool(
    fake: FakeUpstream, ca_file: str, **options: Any
) -> AbstractAsyncContextManager[list[Upstream]]:
    """The pool for ``fake`` alone, no server: ``async with open_pool(fake, ca) as [upstream]``."""
    config = Config(upstreams=(parse_upstream(fake.spec),), ca_file=ca_file, **options)
    return open_upstreams(config)


async def ask(
    upstream: Upstream, name: str, rdtype: str = "A", *, msg_id: int | None = None
) -> dns.message.Message:
    """One query through ``upstream.query``; the answer parsed (its ID is the wire ID).

    No deadline of its own but a guard: a pool that broke fails the test instead of hanging it.
    """
    request = dns.message.make_query(name, rdtype)
    if msg_id is not None:
        request.id = msg_id
    wire = request.to_wire()
    with trio.fail_after(60):
        answer = await upstream.query(wire, parse_query(wire).question_key)
    return dns.message.from_wire(answer)


async def eventually(predicate: Callable[[], bool], *, within: float = 30.0) -> None:
    """Wait (in virtual time, polling every millisecond) until ``predicate()`` holds."""
    with trio.fail_after(within):
        # Polling is the point: the predicates look at state that has no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.001)


@dataclass(frozen=True)
class TlsWrite:
    """One write to a TLS stream: which task made it, on which side, how many bytes, and whether
    it went through ``SSLStream.send_all`` or at once (``RoundSavingSender.send_nowait``)."""

    task: trio.lowlevel.Task
    server_side: bool
    size: int
    eager: bool = False


def record_tls_writes(monkeypatch: pytest.MonkeyPatch) -> list[TlsWrite]:
    """Record every ``trio.SSLStream.send_all`` call and every eager send from now on."""
    writes: list[TlsWrite] = []
    original = trio.SSLStream.send_all
    original_nowait = RoundSavingSender.send_nowait

    async def send_all(self: trio.SSLStream[Any], data: bytes | bytearray | memoryview) -> None:
        writes.append(TlsWrite(trio.lowlevel.current_task(), bool(self.server_side), len(data)))
        await original(self, data)

    def send_nowait(self: RoundSavingSender, data: bytes) -> memoryview | None:
        rest = original_nowait(self, data)
        if rest is not None:
            writes.append(TlsWrite(trio.lowlevel.current_task(), False, len(data), eager=True))
        return rest

    monkeypatch.setattr(trio.SSLStream, "send_all", send_all)
    monkeypatch.setattr(RoundSavingSender, "send_nowait", send_nowait)
    return writes


# --- Upstreams without sockets, for the pools' connect seam (open_upstreams(connect=...)) -------


class FakeConnect:
    """The pools' ``connect``: refuses while ``refusing[port]``, else a memory-stream upstream
    that answers every query at once with :func:`answer_for`.

    ``attempts`` holds, per port, the (trio) time of every connection attempt.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.refusing: dict[int, bool] = {}
        self.attempts: dict[int, list[float]] = {}

    async def __call__(self, spec: UpstreamSpec) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.attempts.setdefault(spec.port, []).append(trio.current_time())
        if self.refusing.get(spec.port, False):
            raise UpstreamConnectError(f"{spec.label}: connect failed: refused (fake)")
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._answer_all, server)
        return client

    async def _answer_all(self, stream: trio.abc.Stream) -> None:
        decoder = FrameDecoder()
        try:
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                while (query := decoder.next_message()) is not NEED_DATA:
                    await stream.send_all(frame(answer_for(query)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
