"""In-process fakes: a DoT upstream served with trio and a trustme certificate.

The fake's behaviour is a coroutine per connection, so each test says exactly what the upstream
does: answer, hang, close mid-frame, send a wrong ID, and so on.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import dns.message
import dns.rrset
import trio
import trustme

from dot_proxy.wire import NEED_DATA, FrameDecoder, frame

AUTH_NAME = "dns.test"

Behaviour = Callable[["UpstreamConnection"], Awaitable[None]]


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
        self.port = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self._context)

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}#{AUTH_NAME}"

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
        try:
            await self.behaviour(UpstreamConnection(stream, self))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
