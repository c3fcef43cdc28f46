"""The server: run the serve loops on bound sockets, stop gracefully.

``serve`` owns two nurseries: the listeners' (UDP receive loops, TCP accept loops) and the work
nursery (per-query UDP tasks, per-connection TCP tasks). Shutdown cancels the listeners first,
then gives work in flight a grace period before cancelling it too.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext

import trio

from dot_proxy.config import Config, cleartext_zones, host_port
from dot_proxy.core.access import AccessList
from dot_proxy.core.local_zones import BUILTIN_NXDOMAIN_ZONES
from dot_proxy.handler import ServerStats
from dot_proxy.resolver import Resolver
from dot_proxy.serve.running import Running, open_running
from dot_proxy.serve.sockets import bind_sockets
from dot_proxy.serve.tcp import serve_tcp
from dot_proxy.serve.udp import serve_udp

__all__ = ["serve"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.0


async def serve(
    config: Config,
    *,
    sockets: Sequence[socket.socket] | None = None,
    stop: trio.Event | None = None,
    stats: ServerStats | None = None,
    resolver: Resolver | None = None,
    running: Running | None = None,
    task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DNS on ``sockets`` (bound from ``config`` if not given) until ``stop`` is set.

    Reports the bound ``(transport, address, port)`` triples through ``task_status``. When
    ``stop`` is set, stops listening, lets queries in flight finish for up to a second, and
    returns. Without ``stop`` it serves until cancelled. Queries go to ``resolver``, already
    open, when given (a test or an embedding program that wants to look at it, or to put
    something of its own there); otherwise ``serve`` opens the cache and the upstreams
    ``config`` names. ``running``, when given, is all of that and what a reload changes
    (``serve.running``), opened by the caller; ``stats`` and ``resolver`` are then its.

    Resource handling: every socket and task is closed on return, and so is every upstream
    connection of a resolver ``serve`` opened; a resolver passed in stays open, its owner's.
    """
    if sockets is None:
        sockets = bind_sockets(config)
    opening: AbstractAsyncContextManager[Running] = (
        open_running(config, stats=stats, resolver=resolver)
        if running is None
        else nullcontext(running)
    )
    try:
        async with opening as state, trio.open_nursery() as work:
            listening = state.listen(work, sockets)
            async with trio.open_nursery() as listeners:
                bound = []
                for sock in sockets:
                    udp = sock.type == socket.SOCK_DGRAM
                    where = await listeners.start(serve_udp if udp else serve_tcp, sock, listening)
                    bound.append(("udp" if udp else "tcp", where[0], where[1]))
                _log_startup(config, bound)
                task_status.started(bound)
                if stop is None:
                    await trio.sleep_forever()
                await stop.wait()
                listeners.cancel_scope.cancel()
            # Stopped listening; queries in flight get a grace period. Idle client
            # connections are cut at its end too, rather than waiting out their idle time;
            # a query still unanswered then gets SERVFAIL (udp.py, tcp.py), not silence.
            log.info("stopping: finishing queries in flight")
            work.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
    finally:
        for sock in sockets:
            sock.close()


def _log_startup(config: Config, bound: list[tuple[str, str, int]]) -> None:
    for transport, address, port in bound:
        log.info("listening on %s %s", transport, host_port(address, port))
    for spec in config.upstreams:
        log.info("forwarding over TLS to %s", spec.description)
    _log_split_dns(config)
    log.info("clients allowed from %s", ", ".join(config.allow))
    if AccessList(config.allow).is_open:
        log.warning(
            "the access list admits every address: this is an open resolver, usable by anyone "
            "who can reach it for floods and amplification"
        )
    if config.ratelimit:
        log.info("rate limit: %g queries/s per /24 (IPv4) or /56 (IPv6)", config.ratelimit)


def _log_split_dns(config: Config) -> None:
    for forward in config.forward:
        if forward.cleartext:
            continue  # said below, louder
        upstreams = ", ".join(target.description for target in forward.targets)
        log.info("forwarding %s over TLS to %s", forward.name, upstreams)
    for warning in cleartext_zones(config):
        log.warning("%s", warning)
    if config.local_zones:
        log.info(
            "answering here, never upstream: localhost., the reverse zones of private and "
            "special addresses, %s (RFC 6761, RFC 6303, RFC 8375)",
            ", ".join(BUILTIN_NXDOMAIN_ZONES),
        )
    else:
        log.info("built-in local zones off: localhost., private reverse zones etc. are forwarded")
    if config.keep_ecs:
        log.info("clients' EDNS Client Subnet options go upstream (--keep-ecs)")
