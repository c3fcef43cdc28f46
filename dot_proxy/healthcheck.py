"""``dot-proxy healthcheck``: is the proxy on this machine serving? For container health checks.

It asks the proxy a question the proxy answers by itself, without any upstream: a query of
opcode STATUS (RFC 1035 §4.1.1, "a server status request"), which the proxy does not implement
and so answers NOTIMP, once over UDP and once over TCP, on the address and port the proxy was
given (the same flags, ``DOT_PROXY_*`` variables and ``--config`` file; a wildcard address is
asked on loopback). Any answer with the query's ID shows that the serve loops read, a task ran
and the answer was written. A REFUSED (loopback outside ``--allow``) shows the same. An
upstream that is down does not make the proxy unhealthy: restarting it would not bring the
upstream back, and the proxy still answers SERVFAIL at once rather than leaving clients to
time out.

With ``--metrics`` set it also asks ``GET /healthz`` on that address (a wildcard on loopback)
and requires 200: the endpoint turns 503 the moment a stop begins, which a DNS query alone
would not see. ``/readyz`` is not asked, for the reason above: it fails while no upstream is
usable, and that is no cause for a restart.

The questions go out together, each given 2 s. Exit status 0 when every one was answered, 1
otherwise, with one line per question. It is the image's ``HEALTHCHECK``.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from http import HTTPStatus

import h11
import trio

from dot_proxy.config import Config, host_port
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.core.message import FLAG_QR, HEADER, HEADER_SIZE, message_id, rcode_name

__all__ = ["HEALTHCHECK_TIMEOUT", "run_healthcheck", "status_query", "target_host"]

# For each question. Docker's and Kubernetes' probe timeouts are longer (5 s, 1 s by default
# for Kubernetes: the manifests set more), so the answer comes from here, not from a kill; the
# questions go out at once, so that three of them still take 2 s at most.
HEALTHCHECK_TIMEOUT = 2.0
OPCODE_STATUS = 2
HEALTH_PATH = "/healthz"
_ROOT_NS_QUESTION = b"\x00\x00\x02\x00\x01"  # ". IN NS"
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# Enough for the endpoint's one-line bodies; a longer answer is not this proxy's.
_MAX_BODY = 4096

Print = Callable[[str], None]
Ask = Callable[[str, int, bytes], Awaitable[bytes]]
# A question: how it is named in its line, and what asks it: (healthy, what was answered).
Check = tuple[str, Callable[[], Awaitable[tuple[bool, str]]]]


def status_query(query_id: int) -> bytes:
    """A STATUS query for ``. IN NS`` with ``query_id``: the proxy answers it NOTIMP itself."""
    return HEADER.pack(query_id, OPCODE_STATUS << 11, 1, 0, 0, 0) + _ROOT_NS_QUESTION


def target_host(listen: tuple[str, ...]) -> str:
    """The address to ask: the first one listened on, a wildcard replaced by loopback."""
    return _LOOPBACK.get(listen[0], listen[0])


async def run_healthcheck(config: Config, *, out: Print = print) -> int:
    """Ask the proxy over UDP and TCP, and ``GET /healthz`` with ``--metrics``; 0 if every
    question was answered (/healthz with 200), each within 2 s, else 1."""
    host = target_host(config.listen)
    where = host_port(host, config.port)
    checks: list[Check] = [
        (f"udp {where}", partial(_ask_dns, _ask_udp, host, config.port)),
        (f"tcp {where}", partial(_ask_dns, _ask_tcp, host, config.port)),
    ]
    if config.metrics is not None:
        metrics_host, metrics_port = config.metrics
        metrics_host = target_host((metrics_host,))
        checks.append(
            (
                f"http {host_port(metrics_host, metrics_port)}{HEALTH_PATH}",
                partial(_ask_health, metrics_host, metrics_port),
            )
        )
    results: list[tuple[bool, str]] = [(False, "")] * len(checks)
    async with trio.open_nursery() as nursery:
        for index, (name, ask) in enumerate(checks):
            nursery.start_soon(_run_check, name, ask, results, index)
    for _, line in results:
        out(line)
    return 0 if all(healthy for healthy, _ in results) else 1


async def _run_check(
    name: str,
    ask: Callable[[], Awaitable[tuple[bool, str]]],
    results: list[tuple[bool, str]],
    index: int,
) -> None:
    started = trio.current_time()
    results[index] = (False, f"{name}: FAILED: no answer within {HEALTHCHECK_TIMEOUT:g} s")
    with trio.move_on_after(HEALTHCHECK_TIMEOUT):
        try:
            healthy, answered = await ask()
        except OSError as exc:
            results[index] = (False, f"{name}: FAILED: {exc.strerror or exc}")
            return
        except h11.RemoteProtocolError as exc:
            results[index] = (False, f"{name}: FAILED: not HTTP ({exc})")
            return
        if not healthy:
            results[index] = (False, f"{name}: FAILED: {answered}")
            return
        elapsed = (trio.current_time() - started) * 1000
        results[index] = (True, f"{name}: {answered} in {elapsed:.1f} ms")


async def _ask_dns(ask: Ask, host: str, port: int) -> tuple[bool, str]:
    query_id = random.randrange(0x10000)
    answer = await ask(host, port, status_query(query_id))
    if not _answers(answer, query_id):
        return False, "the connection closed without an answer"
    return True, f"answered {rcode_name(answer)}"


async def _ask_health(host: str, port: int) -> tuple[bool, str]:
    status, body = await _http_get(host, port, HEALTH_PATH)
    if not status:
        return False, "the connection closed without an answer"
    text = body.decode("utf-8", "replace").strip()[:80]
    return status == HTTPStatus.OK, f"answered {status} {text}".rstrip()


async def _http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """``GET path`` over a connection of its own: the status and (the start of) the body.

    Error handling: raises ``OSError`` when the connection fails, h11's
    ``RemoteProtocolError`` when what comes back is not HTTP.
    """
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=path,
            headers=[("host", host_port(host, port)), ("connection", "close")],
        )
        await stream.send_all(
            (connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b"")
        )
        status, body = 0, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(_MAX_BODY))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body = (body + event.data)[:_MAX_BODY]
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body


def _answers(message: bytes, query_id: int) -> bool:
    if len(message) < HEADER_SIZE:
        return False
    return message_id(message) == query_id and bool(message[2] & (FLAG_QR >> 8))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _ask_udp(host: str, port: int, query: bytes) -> bytes:
    with trio.socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        # Connected: a closed port comes back as ECONNREFUSED at once instead of a timeout.
        await sock.connect((host, port))
        await sock.send(query)
        while True:
            answer = await sock.recv(65535)
            if answer[:2] == query[:2]:
                return answer


async def _ask_tcp(host: str, port: int, query: bytes) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(frame(query))
        decoder = FrameDecoder()
        while True:
            data = await stream.receive_some(65535)
            if not data:
                return b""
            decoder.feed(data)
            answer = decoder.next_message()
            if answer is not NEED_DATA:
                return answer
