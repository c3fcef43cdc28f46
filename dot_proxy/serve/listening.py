"""What the UDP and TCP serve loops share: the handler, the work nursery, limits and policy."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from dot_proxy.core.access import AccessList, RateLimiter
from dot_proxy.core.message import HEADER_SIZE, Rcode, error_reply
from dot_proxy.handler import QueryHandler, ServerStats

__all__ = ["Listening", "cut_off", "refusal"]


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


def refusal(data: bytes) -> bytes | None:
    """REFUSED to a query; nothing to a response or a fragment (no reflection of junk)."""
    return _error_to(data, Rcode.REFUSED)


def cut_off(data: bytes, stats: ServerStats) -> bytes | None:
    """SERVFAIL to a query whose answer a stop cut off: the client hears now that it failed,
    rather than waiting out its own timeout for an answer that will never come."""
    reply = _error_to(data, Rcode.SERVFAIL)
    if reply is not None:
        stats.servfail += 1
    return reply


def _error_to(data: bytes, rcode: Rcode) -> bytes | None:
    if len(data) < HEADER_SIZE or data[2] & 0x80:
        return None
    return error_reply(data, rcode)
