"""The UDP serve loop: datagrams drained per wake-up, one task per query.

It works on a non-blocking stdlib socket woken by ``trio.lowlevel.wait_readable``: under load
one wake-up drains a burst of datagrams, whose tasks then run in one scheduling batch, so their
queries leave for the upstream in one TLS write. trio's socket wrappers would yield after every
call and resolve the address of every datagram sent.
"""

from __future__ import annotations

import logging
import socket
from typing import NoReturn

import trio

from dot_proxy.handler import Pending, ServerStats
from dot_proxy.serve.listening import Listening, cut_off, refusal

__all__ = ["serve_udp"]

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
# Datagrams taken per wake-up at most, so one flooded socket cannot starve the rest. About
# what a receive buffer of the kernel's default size (208 KiB: all an unprivileged proxy gets
# where net.core.rmem_max is unchanged) holds of small queries: a round that runs long (a
# burst of answers, a collector pause) must not leave the socket to overflow because each
# wake-up took a fraction of what was waiting.
BURST = 256


async def serve_udp(
    sock: socket.socket,
    listening: Listening,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Receive datagrams forever, answering each at once (cached, malformed) or in a task.

    A source outside the access list gets REFUSED; one over its rate limit, or arriving when
    ``--max-in-flight`` queries are being resolved, is dropped (the client retries), a cached
    answer included: nothing queues without bound.
    """
    sock.setblocking(False)
    stats, limiter = listening.stats, listening.limiter
    task_status.started(sock.getsockname()[:2])
    while True:
        await trio.lowlevel.wait_readable(sock)
        now = trio.current_time()  # one clock read per burst: the cache's TTLs are whole seconds
        # Read per burst, not once: a configuration reload may replace them.
        access, handler, limited = listening.access, listening.handler, listening.ratelimit
        received = answered = 0
        for _ in range(BURST):
            try:
                data, address = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as exc:
                # e.g. ECONNREFUSED from an ICMP error about an earlier answer: not fatal.
                log.debug("udp receive: %s", exc)
                continue
            received += 1
            if not access.allows(address[0]):
                stats.refused += 1
                if (reply := refusal(data)) is not None:
                    _send_datagram(sock, reply, address, stats)
                    answered += 1
                continue
            if limited is not None and not listening.admits(address[0]):
                continue
            if not limiter.value:
                stats.dropped_busy += 1
                continue
            outcome = handler.answer_at_once(data, now, udp=True)
            if outcome is None:
                continue
            if isinstance(outcome, bytes):
                _send_datagram(sock, outcome, address, stats)
                answered += 1
                continue
            # Taken before the task is spawned (trio #527), released when it ends; free, as
            # nothing awaited since the check above.
            limiter.acquire_nowait()
            listening.nursery.start_soon(
                _answer_datagram, sock, listening, data, outcome, address, now
            )
        stats.queries_udp += received
        if answered:
            # Answered where they were read (cached, refused, malformed), with no clock read
            # per answer: each is counted as having waited the whole burst so far, an upper
            # bound (microseconds at low load).
            stats.query_duration.observe_many(answered, trio.current_time() - now)


def _send_datagram(
    sock: socket.socket, reply: bytes, address: tuple[object, ...], stats: ServerStats
) -> None:
    try:
        sock.sendto(reply, address)
        stats.rcodes[reply[3] & 0x0F] += 1
    except BlockingIOError:
        # The send buffer is full: drop, as the kernel would for a blocking socket under
        # pressure; the client retries. Waiting here would hold a slot.
        stats.dropped_busy += 1
    except OSError as exc:
        log.debug("udp send: %s", exc)


async def _answer_datagram(  # noqa: PLR0917 (start_soon passes arguments by position)
    sock: socket.socket,
    listening: Listening,
    data: bytes,
    pending: Pending,
    address: tuple[object, ...],
    received: float,
) -> None:
    stats = listening.stats
    try:
        reply = await listening.handler.answer(data, pending, udp=True)
    except trio.Cancelled:
        # The stop's grace period ended first. The socket is still open (the server closes it
        # once every task is done): SERVFAIL now, not silence.
        if (servfail := cut_off(data, stats)) is not None:
            _send_datagram(sock, servfail, address, stats)
            stats.query_duration.observe(trio.current_time() - received)
        raise
    else:
        _send_datagram(sock, reply, address, stats)
        stats.query_duration.observe(trio.current_time() - received)
    finally:
        listening.limiter.release()
