"""DNS clients built on trio sockets, so tests can run them under trio's MockClock."""

from __future__ import annotations

import socket

import dns.message
import trio

from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.testing.observability import parse_metrics


def query(name: str = "example.com.", rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    """A dnspython query message (``use_edns``, ``payload``, ``want_dnssec`` pass through)."""
    return dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]


async def udp_exchange(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send one datagram to the proxy and return the first datagram that comes back."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect((host, port))
        await sock.send(data)
        return await sock.recv(65535)


async def udp_send(port: int, data: bytes, *, host: str = "127.0.0.1") -> trio.socket.SocketType:
    """Send one datagram and return the (connected) socket, to read answers or not."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.connect((host, port))
    await sock.send(data)
    return sock


class TcpClient:
    """A client TCP connection to the proxy that can pipeline queries."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()

    @classmethod
    async def connect(cls, port: int, *, host: str = "127.0.0.1") -> TcpClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, *messages: bytes) -> None:
        await self.stream.send_all(b"".join(frame(m) for m in messages))

    async def receive(self) -> bytes | None:
        """The next answer, or None when the proxy closed the connection."""
        while True:
            message = self._decoder.next_message()
            if message is not NEED_DATA:
                return message
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._decoder.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def tcp_exchange(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes | None:
    """One query over a fresh TCP connection."""
    client = await TcpClient.connect(port, host=host)
    try:
        await client.send(data)
        return await client.receive()
    finally:
        await client.aclose()


async def receive_until_closed(client: TcpClient) -> list[bytes]:
    """Every answer still to come on ``client``, read until the proxy closes the connection
    (a reset counts as closed too)."""
    answers = []
    while True:
        try:
            answer = await client.receive()
        except trio.BrokenResourceError:
            return answers
        if answer is None:
            return answers
        answers.append(answer)


async def udp_receive_answer(
    sock: trio.socket.SocketType, request: dns.message.Message
) -> dns.message.Message:
    """Read datagrams from ``sock`` until the answer to ``request`` (same ID and question)
    arrives, skipping answers to anything else sent from the same socket."""
    while True:
        data = await sock.recv(65535)
        try:
            answer = dns.message.from_wire(data)
        except Exception:
            continue
        if answer.id == request.id and answer.question == request.question:
            return answer


async def http_request(port: int, request: bytes, *, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send raw ``request`` bytes to an HTTP server; its status and body, read to its close."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    finally:
        await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def http_get(port: int, path: str, *, method: str = "GET") -> tuple[int, bytes]:
    """One request on a connection of its own (Connection: close)."""
    request = f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    return await http_request(port, request.encode())


async def scrape(port: int) -> dict[str, float]:
    """GET /metrics, parsed: ``'name{label="value",...}'`` (labels sorted) → value."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return parse_metrics(body.decode())
