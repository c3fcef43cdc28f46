"""``dot-proxy healthcheck``: is the proxy on this machine serving? For container health checks.

It asks the proxy a question the proxy answers by itself, without any upstream: a query of
opcode STATUS (RFC 1035 §4.1.1, "a server status request"), which the proxy does not implement
and so answers NOTIMP, once over UDP and once over TCP, on the address and port the proxy was
given (the same flags and ``DOT_PROXY_*`` variables; a wildcard address is asked on loopback).
Any answer with the query's ID shows that the serve loops read, a task ran and the answer was
written. A REFUSED (loopback outside ``--allow``) shows the same. An upstream that is down does
not make the proxy unhealthy: restarting it would not bring the upstream back, and the proxy
still answers SERVFAIL at once rather than leaving clients to time out.

Exit status 0 when both transports answered, 1 otherwise, with one line per transport. It is
the image's ``HEALTHCHECK`` and the Kubernetes manifests' exec probe; once the proxy serves
``GET /healthz`` (``--metrics``), this command is the one place to switch to asking that.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from dot_proxy.config import Config
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame

__all__ = ["HEALTHCHECK_TIMEOUT", "run_healthcheck", "status_query"]

# For each transport. Docker's and Kubernetes' probe timeouts are longer (5 s, 1 s by default
# for Kubernetes: the manifests set more), so the answer comes from here, not from a kill.
HEALTHCHECK_TIMEOUT = 2.0
OPCODE_STATUS = 2
_HEADER = struct.Struct("!HHHHHH")
_ROOT_NS_QUESTION = b"\x00\x00\x02\x00\x01"  # ". IN NS"
_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}

Print = Callable[[str], None]
Ask = Callable[[str, int, bytes], Awaitable[bytes]]


def status_query(query_id: int) -> bytes:
    """A STATUS query for ``. IN NS`` with ``query_id``: the proxy answers it NOTIMP itself."""
    return _HEADER.pack(query_id, OPCODE_STATUS << 11, 1, 0, 0, 0) + _ROOT_NS_QUESTION


def target_host(listen: tuple[str, ...]) -> str:
    """The address to ask: the first one listened on, a wildcard replaced by loopback."""
    return _LOOPBACK.get(listen[0], listen[0])


async def run_healthcheck(config: Config, *, out: Print = print) -> int:
    """Ask the proxy over UDP and TCP; 0 if both answered, each within 2 s, else 1."""
    timeout = HEALTHCHECK_TIMEOUT
    host = target_host(config.listen)
    where = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
    failures = 0
    asks: tuple[tuple[str, Ask], ...] = (("udp", _ask_udp), ("tcp", _ask_tcp))
    for transport, ask in asks:
        query_id = random.randrange(0x10000)
        started = trio.current_time()
        answer = b""
        with trio.move_on_after(timeout):
            try:
                answer = await ask(host, config.port, status_query(query_id))
            except OSError as exc:
                out(f"{transport} {where}: FAILED: {exc.strerror or exc}")
                failures += 1
                continue
        if not _answers(answer, query_id):
            out(f"{transport} {where}: FAILED: no answer within {timeout:g} s")
            failures += 1
            continue
        elapsed = (trio.current_time() - started) * 1000
        out(f"{transport} {where}: answered {_rcode(answer)} in {elapsed:.1f} ms")
    return 1 if failures else 0


def _answers(message: bytes, query_id: int) -> bool:
    if len(message) < _HEADER.size:
        return False
    msg_id, flags = struct.unpack_from("!HH", message)
    return msg_id == query_id and bool(flags & 0x8000)


def _rcode(message: bytes) -> str:
    rcode = message[3] & 0x0F
    return _RCODES[rcode] if rcode < len(_RCODES) else f"rcode {rcode}"


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
