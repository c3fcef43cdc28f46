"""Serve loops: UDP datagrams and TCP client connections, one task per query.

Both work on non-blocking stdlib sockets woken by ``trio.lowlevel.wait_readable``: under load
one wake-up drains a burst of datagrams or frames, whose tasks then run in one scheduling batch,
so their queries leave for the upstream in one TLS write. trio's socket wrappers would yield
after every call and resolve the address of every datagram sent.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass
from typing import NoReturn

import trio

from dot_proxy.access import AccessList, RateLimiter
from dot_proxy.errors import WireError
from dot_proxy.handler import QueryHandler, ServerStats
from dot_proxy.streams import SocketWriter
from dot_proxy.wire import HEADER_SIZE, NEED_DATA, FrameDecoder, Rcode, error_reply, frame

__all__ = ["Listening", "serve_tcp", "serve_udp"]

log = logging.getLogger("dot_proxy.server")

MAX_DATAGRAM = 65535
# Datagrams taken per wake-up at most, so one flooded socket cannot starve the rest. About
# what the kernel's default receive buffer (208 KiB) holds of small queries: a round that
# runs long (a burst of answers, a collector pause) must not leave the socket to overflow
# because each wake-up took a fraction of what was waiting.
BURST = 256
# RFC 7766 §6.2.1.1: a client may pipeline; bound what one connection may have in flight.
MAX_TCP_CLIENT_PIPELINE = 128
_RECEIVE_SIZE = 65536


@dataclass(slots=True)
class Listening:
    """What every serve loop shares: the handler, where tasks live, limits and policy."""

    handler: QueryHandler
    nursery: trio.Nursery  # per-query UDP tasks and per-connection TCP tasks
    limiter: trio.Semaphore  # queries being resolved, all transports (--max-in-flight)
    tcp_clients: trio.Semaphore  # open client connections (--max-tcp-clients)
    stats: ServerStats
    access: AccessList
    ratelimit: RateLimiter | None
    tcp_idle_timeout: float

    def admits(self, host: str) -> bool:
        """Whether a query from ``host`` is within its network's rate (always, if off)."""
        ratelimit = self.ratelimit
        if ratelimit is None or ratelimit.allow(host, trio.current_time()):
            return True
        self.stats.ratelimited += 1
        return False


def _refusal(data: bytes) -> bytes | None:
    # REFUSED to a query; nothing to a response or a fragment (no reflection of junk).
    if len(data) < HEADER_SIZE or data[2] & 0x80:
        return None
    return error_reply(data, Rcode.REFUSED)


async def serve_udp(
    sock: socket.socket,
    listening: Listening,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Receive datagrams forever, answering each in its own task.

    A source outside the access list gets REFUSED; one over its rate limit, or arriving when
    ``--max-in-flight`` queries are being resolved, is dropped (the client retries): nothing
    queues without bound.
    """
    sock.setblocking(False)
    stats, limiter, access = listening.stats, listening.limiter, listening.access
    task_status.started(sock.getsockname()[:2])
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(BURST):
            try:
                data, address = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as exc:
                # e.g. ECONNREFUSED from an ICMP error about an earlier answer: not fatal.
                log.debug("udp receive: %s", exc)
                continue
            if not access.allows(address[0]):
                stats.refused += 1
                if (reply := _refusal(data)) is not None:
                    _send_datagram(sock, reply, address, stats)
                continue
            if not listening.admits(address[0]):
                continue
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                stats.dropped_busy += 1
                continue
            listening.nursery.start_soon(_answer_datagram, sock, listening, data, address)


def _send_datagram(
    sock: socket.socket, reply: bytes, address: tuple[object, ...], stats: ServerStats
) -> None:
    try:
        sock.sendto(reply, address)
    except BlockingIOError:
        # The send buffer is full: drop, as the kernel would for a blocking socket under
        # pressure; the client retries. Waiting here would hold a slot.
        stats.dropped_busy += 1
    except OSError as exc:
        log.debug("udp send: %s", exc)


async def _answer_datagram(
    sock: socket.socket, listening: Listening, data: bytes, address: tuple[object, ...]
) -> None:
    try:
        reply = await listening.handler.answer(data, udp=True)
        if reply is not None:
            _send_datagram(sock, reply, address, listening.stats)
    finally:
        listening.limiter.release()


async def serve_tcp(
    sock: socket.socket,
    listening: Listening,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept connections forever, serving each in its own task.

    With ``--max-tcp-clients`` connections open, no more are accepted until one closes: new
    clients wait in the kernel's backlog instead of costing memory here.
    """
    sock.setblocking(False)
    slots = listening.tcp_clients
    task_status.started(sock.getsockname()[:2])
    while True:
        await slots.acquire()
        try:
            client, address = await _accept(sock)
        except BaseException:
            slots.release()
            raise
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if listening.access.allows(address[0]):
            listening.nursery.start_soon(_serve_tcp_client, client, address[0], listening)
        else:
            listening.stats.refused += 1
            listening.nursery.start_soon(_refuse_tcp_client, client, listening)


async def _accept(sock: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.accept()
        except BlockingIOError:
            continue
        except OSError as exc:
            # Out of file descriptors or memory: back off rather than spin; the kernel
            # backlog holds new clients meanwhile.
            log.warning("tcp accept: %s", exc)
            await trio.sleep(0.1)


async def _refuse_tcp_client(sock: socket.socket, listening: Listening) -> None:
    """Answer a client outside the access list REFUSED once, then close."""
    try:
        with trio.move_on_after(min(2.0, listening.tcp_idle_timeout)):
            decoder = FrameDecoder()
            while (message := decoder.next_message()) is NEED_DATA:
                await trio.lowlevel.wait_readable(sock)
                data = sock.recv(_RECEIVE_SIZE)
                if not data:
                    return
                decoder.feed(data)
            if (reply := _refusal(message)) is not None:
                sock.send(frame(reply))
    except (OSError, WireError):
        pass
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        listening.tcp_clients.release()


@dataclass(slots=True)
class _ClientConnection:
    """One client TCP connection's shared state."""

    sock: socket.socket
    host: str
    listening: Listening
    writer: SocketWriter
    pipeline: trio.Semaphore
    last_answer: float = 0.0


async def _serve_tcp_client(sock: socket.socket, host: str, listening: Listening) -> None:
    """Answer pipelined queries on one client connection (RFC 7766 §6.2.1.1, §7).

    Answers go back as each completes, in any order, each written whole so that they never
    interleave. The connection closes after ``idle`` seconds with nothing in flight and no
    whole query arriving, so a client that sends half a frame and stops is closed too.
    """
    client = _ClientConnection(
        sock, host, listening, SocketWriter(sock), trio.Semaphore(MAX_TCP_CLIENT_PIPELINE)
    )
    try:
        async with trio.open_nursery() as connection:
            connection.start_soon(_write_answers, client.writer, connection.cancel_scope)
            async with trio.open_nursery() as queries:
                await _read_queries(client, queries, listening.tcp_idle_timeout)
            client.writer.close()
            # What the client has not read gets one idle period more to go: a client that
            # never reads must not keep its connection, and its --max-tcp-clients slot.
            connection.cancel_scope.deadline = trio.current_time() + listening.tcp_idle_timeout
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        listening.tcp_clients.release()


async def _write_answers(writer: SocketWriter, connection_scope: trio.CancelScope) -> None:
    try:
        await writer.run()
    except trio.BrokenResourceError:
        connection_scope.cancel()  # the client is gone: its queries need no answers


async def _read_queries(client: _ClientConnection, queries: trio.Nursery, idle: float) -> None:
    decoder = FrameDecoder()
    last_query = trio.current_time()
    while True:
        # One cancel scope per idle period, not per read: the deadline is checked when it
        # fires, and a connection that was busy meanwhile gets a new one.
        with trio.CancelScope(deadline=max(last_query, client.last_answer) + idle) as scope:
            while True:
                # First the frames already read, if the deadline ended a wait among them.
                if await _start_queries(client, decoder, queries, scope):
                    last_query = trio.current_time()
                await trio.lowlevel.wait_readable(client.sock)
                try:
                    data = client.sock.recv(_RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return  # EOF: the caller still answers what is in flight
                try:
                    decoder.feed(data)
                except WireError:
                    return
        if client.pipeline.value == MAX_TCP_CLIENT_PIPELINE:
            now = trio.current_time()
            if now - max(last_query, client.last_answer) >= idle:
                return  # idle: nothing in flight and no whole query for `idle` seconds
        else:
            last_query = trio.current_time()


async def _start_queries(
    client: _ClientConnection,
    decoder: FrameDecoder,
    queries: trio.Nursery,
    idle_scope: trio.CancelScope,
) -> bool:
    started = False
    listening = client.listening
    while True:
        if client.writer.backed_up:
            # The client is not reading its answers: take none of its queries (and read none)
            # until it does, so that what waits for it stays bounded. Before a frame is taken,
            # so that the idle deadline may end this wait without losing one.
            await client.writer.wait_drained()
        if (message := decoder.next_message()) is NEED_DATA:
            return started
        started = True
        if not listening.admits(client.host):
            # Over its network's rate: REFUSED, since a TCP client would wait out its
            # timeout for a dropped query.
            if (reply := _refusal(message)) is not None:
                client.writer.write_nowait(frame(reply))
            continue
        # Take both slots before spawning (trio #527): a client that pipelines faster than
        # we answer waits here, holding nothing.
        for semaphore in (client.pipeline, listening.limiter):
            try:
                semaphore.acquire_nowait()
            except trio.WouldBlock:
                await _wait_for_slot(client, semaphore, idle_scope)
        queries.start_soon(_answer_frame, client, message)


async def _wait_for_slot(
    client: _ClientConnection, semaphore: trio.Semaphore, idle_scope: trio.CancelScope
) -> None:
    # Waiting for a slot is not idleness, and a cancel here would lose the frame just taken
    # from the decoder: the idle deadline is lifted meanwhile. It is put back before any
    # other await, so an idle period that ended meanwhile is checked, as usual, at the next.
    deadline, idle_scope.deadline = idle_scope.deadline, math.inf
    try:
        await semaphore.acquire()
    except BaseException:
        if semaphore is not client.pipeline:
            client.pipeline.release()  # taken already; cancelled waiting for the other
        raise
    finally:
        idle_scope.deadline = deadline


async def _answer_frame(client: _ClientConnection, message: bytes) -> None:
    try:
        reply = await client.listening.handler.answer(message, udp=False)
        if reply is not None:
            client.writer.write_nowait(frame(reply))
            client.last_answer = trio.current_time()
    finally:
        client.listening.limiter.release()
        client.pipeline.release()
