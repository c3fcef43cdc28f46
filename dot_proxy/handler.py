"""One query's life, from the client's bytes to the bytes to answer with; no sockets.

The serve loops hand every query they read to :meth:`QueryHandler.answer_at_once`: a malformed
query gets its error (or nothing), a cached one its answer, and one for a name answered here
(the built-in local zones, the hosts file: :mod:`dot_proxy.routing`) its local answer, there
and then, with no task and no await. Anything else comes back parsed, with the upstream group
its route names, and the loop spawns a task that awaits :meth:`QueryHandler.answer`: the
resolver under one deadline (RFC 7858 / the design's ``trio.move_on_after(timeout)``), or
SERVFAIL. The resolver gives every answer as the client must see it: its ID and question, cut
to its UDP size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from dot_proxy.config import Config
from dot_proxy.core.local_answer import local_answer
from dot_proxy.core.local_zones import Local
from dot_proxy.core.message import Query, Rcode, error_reply, parse_query
from dot_proxy.core.metrics import Histogram
from dot_proxy.errors import UpstreamError, WireError
from dot_proxy.resolver import Resolver
from dot_proxy.routing import Target

__all__ = ["Pending", "QueryHandler", "ServerStats"]

log = logging.getLogger(__name__)

#: A query for the upstreams, and the route's target: what a serve loop hands a task.
Pending = tuple[Query, Target]


@dataclass(slots=True)
class ServerStats:
    """What the server counts as it goes (read them; the server only adds): messages read,
    responses sent by RCODE, the time clients waited, and what it did not pass on."""

    queries_udp: int = 0
    queries_tcp: int = 0
    # Indexed by the header's 4-bit RCODE (RFC 1035 §4.1.1), counted as each answer is sent.
    rcodes: list[int] = field(default_factory=lambda: [0] * 16)
    query_duration: Histogram = field(default_factory=Histogram)
    malformed: int = 0
    refused: int = 0  # sources outside the access list
    ratelimited: int = 0
    dropped_busy: int = 0
    servfail: int = 0
    local: int = 0  # answered here: built-in local zones, hosts file
    timeouts: int = 0
    errors: int = 0


class QueryHandler:
    """Turns one query's bytes into the bytes to answer with."""

    def __init__(self, resolver: Resolver, config: Config, stats: ServerStats) -> None:
        self._resolver = resolver
        self._routes = resolver.routes
        self._timeout = config.timeout
        self._stats = stats

    def reconfigure(self, config: Config) -> None:
        """Give queries from now on ``config``'s deadline (a reload)."""
        self._timeout = config.timeout

    def answer_at_once(self, data: bytes, now: float, *, udp: bool) -> bytes | Pending | None:
        """What can be answered without waiting, or the parsed query to answer in a task.

        Bytes to send back (an error for a malformed query, a cached answer, a local one),
        ``None`` to send nothing (a message not worth an answer), or the :class:`Query` and
        its route's :class:`~dot_proxy.routing.Target`, for :meth:`answer`. Never raises;
        never awaits.
        """
        resolver = self._resolver
        if (answer := resolver.answer_repeated(data, now, udp=udp)) is not None:
            return answer
        try:
            query = parse_query(data)
        except WireError as exc:
            self._stats.malformed += 1
            log.debug("malformed query: %s", exc)
            return None if exc.rcode is None else error_reply(data, exc.rcode)
        answer = resolver.answer_from_cache(data, query, now, udp=udp)
        if answer is not None:
            return answer
        # A local answer is never cached (it costs no more to make than to patch), so a name
        # answered here reaches this point every time; a forwarded one only on a miss.
        route = self._routes.router.route(query.question_key)
        if isinstance(route, Local):
            self._stats.local += 1
            return local_answer(query, route, udp=udp)
        return query, route.target

    async def answer_message(self, data: bytes, now: float, *, udp: bool) -> bytes | None:
        """:meth:`answer_at_once`, then :meth:`answer` if need be: a serve loop's work in one
        call, for callers with no loop of their own (the fuzzer)."""
        outcome = self.answer_at_once(data, now, udp=udp)
        if outcome is None or isinstance(outcome, bytes):
            return outcome
        return await self.answer(data, outcome, udp=udp)

    async def answer(self, data: bytes, pending: Pending, *, udp: bool) -> bytes:
        """The answer to ``pending``'s query (``data`` as the client sent it) from its route's
        upstreams, under one deadline.

        Error handling: never raises but Cancelled. Upstream failure or timeout → SERVFAIL; a
        bug → SERVFAIL, logged with its traceback.
        """
        query, target = pending
        try:
            # One deadline covers the cache's coalescing, pool checkout, connect, handshake,
            # send and receive, retries and failover included.
            with trio.move_on_after(self._timeout):
                return await self._resolver.resolve(data, query, udp=udp, target=target)
            self._stats.timeouts += 1
            log.debug("no answer within %g s", self._timeout)
        except UpstreamError as exc:
            log.debug("upstream failed: %s", exc)
        except Exception:
            self._stats.errors += 1
            log.exception("failed to answer a query")
        self._stats.servfail += 1
        reply = error_reply(query, Rcode.SERVFAIL)
        assert reply is not None  # a parsed query always has a header to reply to
        return reply
