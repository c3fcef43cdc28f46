"""One query's path from client bytes to answer bytes, under one deadline; no sockets."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from dot_proxy.config import Config
from dot_proxy.core.edns import pad_query, strip_padding
from dot_proxy.core.message import (
    HEADER_SIZE,
    Rcode,
    error_reply,
    parse_query,
    replace_id,
    truncate_for_udp,
)
from dot_proxy.errors import UpstreamError, WireError
from dot_proxy.upstream.group import UpstreamGroup

__all__ = ["QueryHandler", "ServerStats"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerStats:
    """Counters of what the server did not pass on (read them; the server only adds)."""

    malformed: int = 0
    refused: int = 0  # sources outside the access list
    ratelimited: int = 0
    dropped_busy: int = 0
    servfail: int = 0
    timeouts: int = 0
    errors: int = 0


class QueryHandler:
    """Turns one query's bytes into the bytes to answer with, under one deadline."""

    def __init__(self, resolver: UpstreamGroup, config: Config, stats: ServerStats) -> None:
        self._resolver = resolver
        self._timeout = config.timeout
        self._padding = config.padding
        self._stats = stats

    async def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        """The answer to send back, or ``None`` to send nothing.

        Error handling: never raises but Cancelled. Malformed → FORMERR/NOTIMP or nothing;
        upstream failure or timeout → SERVFAIL; a bug → SERVFAIL, logged with its traceback.
        """
        try:
            query = parse_query(data)
            # The query's question ends here, and so does a matched answer's (same key length).
            question_end = HEADER_SIZE + len(query.question)
            # RFC 8467 §4.1: padded on the encrypted hop; padding checks the EDNS options too.
            if self._padding:
                outgoing, added_opt = pad_query(data, question_end=question_end)
            else:
                outgoing, added_opt = data, False
        except WireError as exc:
            self._stats.malformed += 1
            log.debug("malformed query: %s", exc)
            return None if exc.rcode is None else error_reply(data, exc.rcode)
        try:
            # RFC 7858 / design: one deadline covers pool checkout, connect, handshake, send
            # and receive, retries and failover included.
            with trio.move_on_after(self._timeout):
                answer = await self._resolver.resolve(outgoing, query.question_key)
                # RFC 7830 §6 / RFC 8467: padding is for the encrypted hop only; an OPT
                # record we added for it is not the client's either.
                answer = strip_padding(answer, remove_opt=added_opt, question_end=question_end)
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
