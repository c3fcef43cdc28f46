"""The trio shell: listening sockets, serve loops, and one task per query.

``serve`` owns two nurseries: the listeners' (UDP receive loops, TCP accept loops) and the work
nursery (per-query UDP tasks, per-connection TCP tasks). Shutdown cancels the listeners first,
then gives work in flight a grace period before cancelling it too.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import trio

from dot_proxy.config import Config
from dot_proxy.errors import ConfigError, UpstreamError, WireError
from dot_proxy.resolver import Resolver
from dot_proxy.streams import BatchWriter
from dot_proxy.upstream import open_upstreams
from dot_proxy.wire import (
    NEED_DATA,
    FrameDecoder,
    Rcode,
    error_reply,
    frame,
    parse_query,
    replace_id,
    truncate_for_udp,
)

__all__ = ["QueryHandler", "ServerStats", "bind_sockets", "serve", "serve_tcp", "serve_udp"]

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
SHUTDOWN_GRACE = 1.0
TCP_BACKLOG = 1024
# RFC 7766 §6.2.1.1: a client may pipeline; bound what one connection may have in flight.
MAX_TCP_CLIENT_PIPELINE = 128
_RECEIVE_SIZE = 65536


@dataclass(slots=True)
class ServerStats:
    """Counters of what the server did not pass on (read them; the server only adds)."""

    malformed: int = 0
    dropped_busy: int = 0
    servfail: int = 0
    timeouts: int = 0
    errors: int = 0


class QueryHandler:
    """Turns one query's bytes into the bytes to answer with, under one deadline."""

    def __init__(self, resolver: Resolver, config: Config, stats: ServerStats) -> None:
        self._resolver = resolver
        self._timeout = config.timeout
        self._stats = stats

    async def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        """The answer to send back, or ``None`` to send nothing.

        Error handling: never raises but Cancelled. Malformed → FORMERR/NOTIMP or nothing;
        upstream failure or timeout → SERVFAIL; a bug → SERVFAIL, logged with its traceback.
        """
        try:
            query = parse_query(data)
        except WireError as exc:
            self._stats.malformed += 1
            log.debug("malformed query: %s", exc)
            return None if exc.rcode is None else error_reply(data, exc.rcode)
        try:
            # RFC 7858 / design: one deadline covers pool checkout, connect, handshake, send
            # and receive, retries and failover included.
            with trio.move_on_after(self._timeout):
                answer = await self._resolver.resolve(data, query.question_key)
                answer = replace_id(answer, query.id)
                return truncate_for_udp(answer, query.udp_limit) if udp else answer
            self._stats.timeouts += 1
            log.debug("no answer within %g s", self._timeout)
        except UpstreamError as exc:
            log.debug("upstream failed: %s", exc)
        except Exception:
            self._stats.errors += 1
            log.exception("failed to answer a query")
        self._stats.servfail += 1
        return error_reply(query, Rcode.SERVFAIL)


async def serve_udp(
    sock: trio.socket.SocketType,
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
    task_status.started(sock.getsockname()[:2])
    while True:
        try:
            data, address = await sock.recvfrom(MAX_DATAGRAM)
        except OSError as exc:
            # e.g. ECONNREFUSED from an ICMP error about an earlier answer: not fatal.
            log.debug("udp receive: %s", exc)
            continue
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            stats.dropped_busy += 1
            continue
        nursery.start_soon(_answer_datagram, sock, handler, limiter, data, address)


async def _answer_datagram(
    sock: trio.socket.SocketType,
    handler: QueryHandler,
    limiter: trio.Semaphore,
    data: bytes,
    address: tuple[object, ...],
) -> None:
    try:
        reply = await handler.answer(data, udp=True)
        if reply is not None:
            await sock.sendto(reply, address)
    except OSError as exc:
        log.debug("udp send: %s", exc)
    finally:
        limiter.release()


async def serve_tcp(
    sock: trio.socket.SocketType,
    handler: QueryHandler,
    nursery: trio.Nursery,
    limiter: trio.Semaphore,
    config: Config,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept connections forever, serving each in its own task in ``nursery``."""
    listener = trio.SocketListener(sock)
    task_status.started(sock.getsockname()[:2])
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            # Out of file descriptors or memory: back off rather than spin; the kernel backlog
            # holds new clients meanwhile.
            log.warning("tcp accept: %s", exc)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(_serve_tcp_client, stream, handler, limiter, config.tcp_idle_timeout)


async def _serve_tcp_client(
    stream: trio.SocketStream, handler: QueryHandler, limiter: trio.Semaphore, idle: float
) -> None:
    """Answer pipelined queries on one client connection (RFC 7766 §6.2.1.1, §7).

    Answers go back as each completes, in any order, through one writer so that they never
    interleave. The connection closes after ``idle`` seconds with nothing in flight and no
    whole query arriving, so a client that sends half a frame and stops is closed too.
    """
    writer = BatchWriter(stream)
    pipeline = trio.Semaphore(MAX_TCP_CLIENT_PIPELINE)
    try:
        async with trio.open_nursery() as connection:
            connection.start_soon(_write_answers, writer, connection.cancel_scope)
            async with trio.open_nursery() as queries:
                await _read_queries(stream, handler, limiter, pipeline, writer, queries, idle)
            writer.close()
    finally:
        await trio.aclose_forcefully(stream)


async def _write_answers(writer: BatchWriter, connection_scope: trio.CancelScope) -> None:
    try:
        await writer.run()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        connection_scope.cancel()  # the client is gone: its queries need no answers


async def _read_queries(  # noqa: PLR0917
    stream: trio.SocketStream,
    handler: QueryHandler,
    limiter: trio.Semaphore,
    pipeline: trio.Semaphore,
    writer: BatchWriter,
    queries: trio.Nursery,
    idle: float,
) -> None:
    decoder = FrameDecoder()
    deadline = trio.current_time() + idle
    while True:
        with trio.CancelScope(deadline=deadline) as wait:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if wait.cancelled_caught:
            if pipeline.value == MAX_TCP_CLIENT_PIPELINE:
                return  # idle: nothing in flight and no whole query for `idle` seconds
            deadline = trio.current_time() + idle
            continue
        if not data:
            return  # EOF: the caller still answers what is in flight
        try:
            decoder.feed(data)
        except WireError:
            return
        while (message := decoder.next_message()) is not NEED_DATA:
            await pipeline.acquire()
            await limiter.acquire()
            queries.start_soon(_answer_frame, handler, limiter, pipeline, writer, message)
            deadline = trio.current_time() + idle


async def _answer_frame(
    handler: QueryHandler,
    limiter: trio.Semaphore,
    pipeline: trio.Semaphore,
    writer: BatchWriter,
    message: bytes,
) -> None:
    try:
        reply = await handler.answer(message, udp=False)
        if reply is not None:
            writer.write_nowait(frame(reply))
    finally:
        limiter.release()
        pipeline.release()


def bind_sockets(config: Config) -> list[socket.socket]:
    """Bind a UDP and a TCP socket on each listen address, all on one port.

    With ``port`` 0 the kernel picks a port for the first socket and every other socket takes
    the same one, so a client can use UDP and TCP alike (tests read it back).

    Error handling: raises :class:`ConfigError` with a one-line explanation (no privilege for
    a low port, address in use, address not on this host). Resource handling: on error, every
    socket opened so far is closed.
    """
    for _attempt in range(20):
        try:
            return _bind_all(config)
        except _PortTaken:
            continue
    raise ConfigError("--port 0: could not find one free port for UDP and TCP")


class _PortTaken(Exception):
    pass


def _bind_all(config: Config) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    port = config.port
    defaults = config.listen == Config.__dataclass_fields__["listen"].default
    try:
        for address in config.listen:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                try:
                    sock = _bind_one(address, port, kind)
                except OSError as exc:
                    if defaults and address == "::" and exc.errno in _NO_IPV6:
                        log.warning("IPv6 is not available here; listening on IPv4 only")
                        break
                    if config.port == 0 and sockets and exc.errno == errno.EADDRINUSE:
                        raise _PortTaken from exc
                    raise _bind_error(address, port, exc) from None
                sockets.append(sock)
                port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def _bind_one(address: str, port: int, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            # Separate IPv4 and IPv6 sockets, so "0.0.0.0" and "::" can both be bound.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_error(address: str, port: int, exc: OSError) -> ConfigError:
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"--port: no permission to listen on {where}: ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE; choose another port, e.g. --port 5353"
        )
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"--port: {where} is already in use (another DNS server?); stop it or choose "
            "another port, e.g. --port 5353"
        )
    return ConfigError(f"--listen: cannot listen on {where}: {exc.strerror or exc}")


async def serve(
    config: Config,
    *,
    sockets: Sequence[socket.socket] | None = None,
    stop: trio.Event | None = None,
    stats: ServerStats | None = None,
    task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DNS on ``sockets`` (bound from ``config`` if not given) until ``stop`` is set.

    Reports the bound ``(transport, address, port)`` triples through ``task_status``. When
    ``stop`` is set, stops listening, lets queries in flight finish for up to a second, and
    returns. Without ``stop`` it serves until cancelled.

    Resource handling: every socket, task and upstream connection is closed on return.
    """
    if sockets is None:
        sockets = bind_sockets(config)
    stats = stats if stats is not None else ServerStats()
    trio_sockets = [trio.socket.from_stdlib_socket(sock) for sock in sockets]
    try:
        async with open_upstreams(config) as upstreams:
            handler = QueryHandler(Resolver(upstreams), config, stats)
            limiter = trio.Semaphore(config.max_in_flight)
            async with trio.open_nursery() as work:
                async with trio.open_nursery() as listeners:
                    bound = []
                    for sock in trio_sockets:
                        if sock.type == socket.SOCK_DGRAM:
                            where = await listeners.start(
                                serve_udp, sock, handler, work, limiter, stats
                            )
                            bound.append(("udp", where[0], where[1]))
                        else:
                            where = await listeners.start(
                                serve_tcp, sock, handler, work, limiter, config
                            )
                            bound.append(("tcp", where[0], where[1]))
                    _log_startup(config, bound)
                    task_status.started(bound)
                    if stop is None:
                        await trio.sleep_forever()
                    await stop.wait()
                    listeners.cancel_scope.cancel()
                # Stopped listening; queries in flight get a grace period. Idle client
                # connections are cut at its end too, rather than waiting out their idle time.
                log.info("stopping: finishing queries in flight")
                work.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
    finally:
        for sock in trio_sockets:
            sock.close()


def _log_startup(config: Config, bound: list[tuple[str, str, int]]) -> None:
    for transport, address, port in bound:
        shown = f"[{address}]" if ":" in address else address
        log.info("listening on %s %s:%d", transport, shown, port)
    for spec in config.upstreams:
        log.info("forwarding over TLS to %s", spec.label)
