"""The TCP serve loop: client connections, pipelined queries, one task per query.

Client sockets are non-blocking stdlib sockets woken by trio: one wake-up reads every frame that
arrived (RFC 7766 §6.2.1.1 pipelining), and answers are written back whole as each completes.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass
from typing import NoReturn

import trio

from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.errors import WireError
from dot_proxy.handler import Pending
from dot_proxy.serve.client_writer import SocketWriter
from dot_proxy.serve.listening import Listening, cut_off, refusal

__all__ = ["MAX_TCP_CLIENT_PIPELINE", "serve_tcp"]

log = logging.getLogger(__name__)

# RFC 7766 §6.2.1.1: a client may pipeline; bound what one connection may have in flight.
MAX_TCP_CLIENT_PIPELINE = 128
_RECEIVE_SIZE = 65536


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
            listening.stats.queries_tcp += 1
            if (reply := refusal(message)) is not None:
                sock.send(frame(reply))
                listening.stats.rcodes[reply[3] & 0x0F] += 1
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
        listening.stats.queries_tcp += 1
        received = trio.current_time()
        if not listening.admits(client.host):
            # Over its network's rate: REFUSED, since a TCP client would wait out its
            # timeout for a dropped query.
            if (reply := refusal(message)) is not None:
                _answered(client, reply, received)
            continue
        pipeline, limiter = client.pipeline, listening.limiter
        if not (pipeline.value and limiter.value):
            # Take both slots, waiting if need be (a client that pipelines faster than we
            # answer waits here, holding nothing), then give them back for the answer below:
            # a cached answer obeys the bounds as a query to the upstreams does.
            for semaphore in (pipeline, limiter):
                try:
                    semaphore.acquire_nowait()
                except trio.WouldBlock:
                    await _wait_for_slot(client, semaphore, idle_scope)
            pipeline.release()
            limiter.release()
        outcome = listening.handler.answer_at_once(message, received, udp=False)
        if outcome is None:
            continue
        if isinstance(outcome, bytes):
            # Answered where it was read: no task, no hand-off.
            _answered(client, outcome, received)
            continue
        # Both slots are free (nothing awaited since they were): taken before spawning
        # (trio #527), released when the task ends.
        pipeline.acquire_nowait()
        limiter.acquire_nowait()
        queries.start_soon(_answer_frame, client, message, outcome, received)


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


async def _answer_frame(
    client: _ClientConnection, message: bytes, pending: Pending, received: float
) -> None:
    try:
        reply = await client.listening.handler.answer(message, pending, udp=False)
    except trio.Cancelled:
        # The stop's grace period ended first (or the client is gone, and the write is a
        # no-op): SERVFAIL before the connection's finally closes the socket, not silence.
        if (servfail := cut_off(message, client.listening.stats)) is not None:
            _answered(client, servfail, received)
        raise
    else:
        _answered(client, reply, received)
    finally:
        client.listening.limiter.release()
        client.pipeline.release()


def _answered(client: _ClientConnection, reply: bytes, received: float) -> None:
    """Queue ``reply`` for the client and count it: its RCODE, how long the client waited."""
    client.writer.write_nowait(frame(reply))
    client.last_answer = now = trio.current_time()
    stats = client.listening.stats
    stats.rcodes[reply[3] & 0x0F] += 1
    stats.query_duration.observe(now - received)
