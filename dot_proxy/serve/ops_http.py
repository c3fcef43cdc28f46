"""The operations endpoint: HTTP/1.1 on trio for /metrics, /healthz and /readyz.

HTTP framing is h11's (sans-I/O, as the DNS core is ours: bytes in, events out), so
keep-alive, pipelined requests, chunked bodies and malformed requests are handled the way the
RFCs say rather than by a hand-written parser; this module only moves bytes and bounds them.
It runs in the server's own trio loop beside the DNS serve loops, never on their path: a
scrape costs the queries nothing but the moment it takes to render (a millisecond or so).

Bounds, so that a client of this port can never disturb DNS service: at most
``MAX_CLIENTS`` connections at once (more wait in the kernel's backlog), a request's head at
most ``MAX_REQUEST`` bytes (h11 answers 431 past it), no body worth reading, and each request
— the wait for it on a kept-alive connection included — within ``REQUEST_TIMEOUT`` seconds,
or the connection is closed.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, NoReturn

import h11
import trio

from dot_proxy.errors import ConfigError
from dot_proxy.serve.exposition import CONTENT_TYPE

__all__ = ["OpsEndpoints", "bind_ops_socket", "serve_ops"]

log = logging.getLogger(__name__)

MAX_CLIENTS: Final = 16
MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 10.0
_RECEIVE_SIZE: Final = 4096
_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class OpsEndpoints:
    """What the endpoint reports: the metrics (rendered when asked), and whether the server
    is alive (its serve loops run) and ready (alive, not stopping, an upstream usable)."""

    metrics: Callable[[], Awaitable[bytes]]
    live: Callable[[], bool]
    ready: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    content_type: str
    body: bytes


def bind_ops_socket(address: tuple[str, int], where: str = "--metrics") -> socket.socket:
    """A listening TCP socket on ``address``, bound now (before privileges are dropped and
    workers forked: they all serve this one socket).

    Error handling: raises :class:`ConfigError` naming ``where`` when it cannot be bound.
    """
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        raise ConfigError(
            f"{where}: cannot listen on {shown}:{port}: {exc.strerror or exc}"
        ) from None
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    log.info(
        "metrics, health and readiness on http://%s:%d/ (/metrics, /healthz, /readyz)",
        shown,
        bound[1],
    )
    return sock


async def serve_ops(
    sock: socket.socket,
    endpoints: OpsEndpoints,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve HTTP on the bound, listening ``sock`` forever; report its address when ready.

    Resource handling: each connection is closed when its task ends, cancelled or not, and
    ``sock`` when this ends (in a worker: its copy; the parent keeps its own for restarts).
    """
    sock.setblocking(False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    slots = trio.Semaphore(MAX_CLIENTS)
    task_status.started(sock.getsockname()[:2])
    async with listener, trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of file descriptors: back off; the backlog holds the client meanwhile.
                slots.release()
                log.warning("metrics endpoint accept: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_serve_client, stream, endpoints, slots)


async def _serve_client(
    stream: trio.SocketStream, endpoints: OpsEndpoints, slots: trio.Semaphore
) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT):
                if not await _one_exchange(stream, connection, endpoints):
                    return
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
                continue
            return  # too slow: closed
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away
    finally:
        await trio.aclose_forcefully(stream)
        slots.release()


async def _one_exchange(
    stream: trio.SocketStream, connection: h11.Connection, endpoints: OpsEndpoints
) -> bool:
    """Read one request and answer it; False when the connection is done."""
    try:
        request = await _read_request(stream, connection)
    except h11.RemoteProtocolError as exc:
        # Malformed, or a head over MAX_REQUEST: say so if h11 still lets us, then close.
        response = _Response(exc.error_status_hint, _TEXT, b"bad request\n")
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send(stream, connection, response, head_only=False)
            await _linger(stream)
        return False
    if request is None:
        return False
    response = await _respond(request, endpoints)
    await _send(stream, connection, response, head_only=request.method == b"HEAD")
    return True


async def _linger(stream: trio.SocketStream) -> None:
    # Closing with the rest of a request unread makes the kernel send a reset, which can
    # destroy the error response before the client reads it: send our EOF, read (and drop)
    # what the client is still sending for a moment, then close.
    with trio.move_on_after(1.0):
        await stream.send_eof()
        drained = 0
        while drained < 16 * MAX_REQUEST and (data := await stream.receive_some(_RECEIVE_SIZE)):
            drained += len(data)


async def _read_request(
    stream: trio.SocketStream, connection: h11.Connection
) -> h11.Request | None:
    """The next whole request (its body read and dropped), or None at the client's EOF."""
    request: h11.Request | None = None
    body = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_REQUEST:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # h11.PAUSED cannot happen before the response is sent
            return None


async def _respond(request: h11.Request, endpoints: OpsEndpoints) -> _Response:
    path = request.target.partition(b"?")[0]
    if path not in (b"/metrics", b"/healthz", b"/readyz"):
        return _Response(404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n")
    if request.method not in (b"GET", b"HEAD"):
        return _Response(405, _TEXT, b"method not allowed: GET or HEAD\n")
    if path == b"/metrics":
        return _Response(200, CONTENT_TYPE, await endpoints.metrics())
    if path == b"/healthz":
        live = endpoints.live()
        return _Response(200 if live else 503, _TEXT, b"ok\n" if live else b"not serving\n")
    ready = endpoints.ready()
    return _Response(200 if ready else 503, _TEXT, b"ready\n" if ready else b"not ready\n")


async def _send(
    stream: trio.SocketStream, connection: h11.Connection, response: _Response, *, head_only: bool
) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if response.status == 405:
        headers.append((b"allow", b"GET, HEAD"))
    reason = HTTPStatus(response.status).phrase.encode()
    head = h11.Response(status_code=response.status, headers=headers, reason=reason)
    data = connection.send(head) or b""
    if not head_only:
        data += connection.send(h11.Data(data=response.body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
