"""Serve loops: UDP datagrams and TCP client connections, one task per query.

Both work on non-blocking stdlib sockets woken by ``trio.lowlevel.wait_readable``: under load
one wake-up drains a burst of datagrams or frames, whose tasks then run in one scheduling batch,
so their queries leave for the upstream in one TLS write. trio's socket wrappers would yield
after every call and resolve the address of every datagram sent.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import NoReturn

import trio

from dot_proxy.errors import WireError
from dot_proxy.handler import QueryHandler, ServerStats
from dot_proxy.streams import SocketWriter
from dot_proxy.wire import NEED_DATA, FrameDecoder, frame

__all__ = ["serve_tcp", "serve_udp"]

log = logging.getLogger("dot_proxy.server")

MAX_DATAGRAM = 65535
# Datagrams or connections taken per wake-up at most, so one busy socket cannot starve others.
BURST = 64
# RFC 7766 §6.2.1.1: a client may pipeline; bound what one connection may have in flight.
MAX_TCP_CLIENT_PIPELINE = 128
_RECEIVE_SIZE = 65536


async def serve_udp(
    sock: socket.socket,
    handler: QueryHandler,
    nursery: trio.Nursery,
    limiter: trio.Semaphore,
    stats: ServerStats,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Receive datagrams forever, answering each in its own task in ``nursery``.

    A full ``limiter`` drops the datagram (the client retries); nothing queues without bound.
    """
    sock.setblocking(False)
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
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                stats.dropped_busy += 1
                continue
            nursery.start_soon(_answer_datagram, sock, handler, limiter, stats, data, address)


async def _answer_datagram(  # noqa: PLR0917
    sock: socket.socket,
    handler: QueryHandler,
    limiter: trio.Semaphore,
    stats: ServerStats,
    data: bytes,
    address: tuple[object, ...],
) -> None:
    try:
        reply = await handler.answer(data, udp=True)
        if reply is not None:
            try:
                sock.sendto(reply, address)
            except BlockingIOError:
                # The send buffer is full: drop, as the kernel would for a blocking socket
                # under pressure; the client retries. Waiting here would hold a slot.
                stats.dropped_busy += 1
            except OSError as exc:
                log.debug("udp send: %s", exc)
    finally:
        limiter.release()


async def serve_tcp(
    sock: socket.socket,
    handler: QueryHandler,
    nursery: trio.Nursery,
    limiter: trio.Semaphore,
    idle: float,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept connections forever, serving each in its own task in ``nursery``."""
    sock.setblocking(False)
    task_status.started(sock.getsockname()[:2])
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(BURST):
            try:
                client, _address = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                # Out of file descriptors or memory: back off rather than spin; the kernel
                # backlog holds new clients meanwhile.
                log.warning("tcp accept: %s", exc)
                await trio.sleep(0.1)
                break
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(_serve_tcp_client, client, handler, limiter, idle)


@dataclass(slots=True)
class _ClientConnection:
    """One client TCP connection's shared state."""

    sock: socket.socket
    handler: QueryHandler
    limiter: trio.Semaphore
    writer: SocketWriter
    pipeline: trio.Semaphore
    last_answer: float = 0.0


async def _serve_tcp_client(
    sock: socket.socket, handler: QueryHandler, limiter: trio.Semaphore, idle: float
) -> None:
    """Answer pipelined queries on one client connection (RFC 7766 §6.2.1.1, §7).

    Answers go back as each completes, in any order, each written whole so that they never
    interleave. The connection closes after ``idle`` seconds with nothing in flight and no
    whole query arriving, so a client that sends half a frame and stops is closed too.
    """
    client = _ClientConnection(
        sock, handler, limiter, SocketWriter(sock), trio.Semaphore(MAX_TCP_CLIENT_PIPELINE)
    )
    try:
        async with trio.open_nursery() as connection:
            connection.start_soon(_write_answers, client.writer, connection.cancel_scope)
            async with trio.open_nursery() as queries:
                await _read_queries(client, queries, idle)
            client.writer.close()
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


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
        with trio.CancelScope(deadline=max(last_query, client.last_answer) + idle):
            while True:
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
                if await _start_queries(client, decoder, queries):
                    last_query = trio.current_time()
        if client.pipeline.value == MAX_TCP_CLIENT_PIPELINE:
            now = trio.current_time()
            if now - max(last_query, client.last_answer) >= idle:
                return  # idle: nothing in flight and no whole query for `idle` seconds
        else:
            last_query = trio.current_time()


async def _start_queries(
    client: _ClientConnection, decoder: FrameDecoder, queries: trio.Nursery
) -> bool:
    started = False
    while (message := decoder.next_message()) is not NEED_DATA:
        # Take both slots before spawning (trio #527): a client that pipelines faster than
        # we answer waits here, holding nothing.
        for semaphore in (client.pipeline, client.limiter):
            try:
                semaphore.acquire_nowait()
            except trio.WouldBlock:
                await semaphore.acquire()
        queries.start_soon(_answer_frame, client, message)
        started = True
    return started


async def _answer_frame(client: _ClientConnection, message: bytes) -> None:
    try:
        reply = await client.handler.answer(message, udp=False)
        if reply is not None:
            client.writer.write_nowait(frame(reply))
            client.last_answer = trio.current_time()
    finally:
        client.limiter.release()
        client.pipeline.release()
