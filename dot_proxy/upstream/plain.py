"""The ``plain:`` transport: a cleartext resolver on the local network, over UDP, and TCP when
the answer is truncated (RFC 1035 §4.2, RFC 7766 §5).

Cleartext on a network we do not own invites forged answers, so each query follows RFC 5452:
a fresh socket, hence a source port the kernel picks at random from its ephemeral range
(Linux randomises UDP port selection), and a random ID from the system's CSPRNG (§9.2); the
socket is connected, so the kernel drops datagrams from any other address or port (§9.1); and
an answer counts only if its ID matches and it repeats the question (§9.1, case-insensitively,
RFC 4343). Anything else is dropped and the wait goes on, so a forged answer cannot displace
the real one. A lost datagram is sent again after one second, then two, four, ... until the
caller's deadline: there is no timeout here (STYLE §4), the query's cancel scope bounds it.

Callers send queries here unpadded (RFC 8467 padding hides sizes only on encrypted hops) and
without ECS, as to any upstream. trio and OS errors become :mod:`dot_proxy.errors`.
"""

from __future__ import annotations

import logging
import random
import socket
from typing import Final

import trio

from dot_proxy.config import PlainSpec
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.core.message import FLAG_TC, HEADER_SIZE, answer_matches, message_id, replace_id
from dot_proxy.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    WireError,
    fresh,
)
from dot_proxy.upstream.race import Race, race_lost

__all__ = ["PlainUpstream"]

log = logging.getLogger(__name__)

#: When a UDP query is sent again. A resolver on the local network answers in milliseconds, so
#: a second of silence means a lost datagram; each further wait doubles (RFC 1536 §1: back off
#: exponentially). RFC 1035 §4.2.1's 2-5 s minimum is for servers across the 1987 Internet.
RETRANSMIT_AFTER: Final = 1.0
_RECEIVE_SIZE: Final = 65536


class _Attempt:
    """One query's exchange, run by a task in the upstream's nursery."""

    __slots__ = ("answer", "error", "scope")

    def __init__(self) -> None:
        self.answer: bytes | None = None
        self.error: UpstreamError | None = None
        self.scope = trio.CancelScope()


class PlainUpstream:
    """One cleartext resolver; each query on its own socket.

    As with the TLS pool, the task that reads the socket is not the query's: it runs in
    ``nursery`` (the upstream group's), and the query's task waits on its race, so a query
    whose hedge won elsewhere stops waiting at once and its exchange is cancelled. ``rng``
    draws the query IDs (tests pass a seeded one); by default the system's CSPRNG.

    Resource handling: an exchange's socket closes when it ends, is cancelled, or its query
    gives up; nothing outlives ``nursery``.
    """

    def __init__(
        self, spec: PlainSpec, nursery: trio.Nursery, *, rng: random.Random | None = None
    ) -> None:
        self.spec = spec
        self._nursery = nursery
        self._rng = rng or random.SystemRandom()
        self._family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET

    @property
    def connections(self) -> tuple[()]:
        """None kept open: each query has a socket of its own, closed when it is answered."""
        return ()

    async def query(self, message: bytes, key: bytes, race: Race | None = None) -> bytes:
        """Resolve one query; the answer carries an arbitrary ID (the caller puts the
        client's back). ``key`` is the query's ``question_key``.

        Runs until answered or cancelled (the caller's deadline). With ``race``, gives up
        with :class:`RaceLost` once another attempt at the same query has won.

        Error handling: raises :class:`UpstreamConnectError` when the resolver cannot be
        reached (no route, ICMP port unreachable, TCP refused), :class:`UpstreamClosed` when
        a TCP connection closes before the answer, :class:`UpstreamProtocolError` when one
        carries something that is not the answer.
        """
        waiter = race if race is not None else Race()
        if waiter.answer is not None:
            raise race_lost(self.spec.label)
        attempt = _Attempt()
        self._nursery.start_soon(self._run, attempt, message, key, waiter)
        try:
            while attempt.answer is None and attempt.error is None:
                if waiter.answer is not None:
                    raise race_lost(self.spec.label)
                await waiter.wait()
        finally:
            attempt.scope.cancel()
        if attempt.answer is None:
            assert attempt.error is not None
            raise attempt.error
        return attempt.answer

    async def _run(self, attempt: _Attempt, message: bytes, key: bytes, waiter: Race) -> None:
        with attempt.scope:
            try:
                attempt.answer = await self._exchange(message, key)
            except UpstreamError as exc:
                attempt.error = fresh(exc)  # raised in the query's task (see errors.fresh)
            except Exception:
                # STYLE §6: a bug fails this query, never the nursery the upstreams share.
                log.exception("%s: exchange failed", self.spec.label)
                attempt.error = UpstreamProtocolError(f"{self.spec.label}: exchange failed")
            finally:
                waiter.wake()

    async def _exchange(self, message: bytes, key: bytes) -> bytes:
        answer = await self._udp(message, key)
        if not answer[2] & (FLAG_TC >> 8):
            return answer
        # RFC 7766 §5: a truncated answer is asked again over TCP.
        return await self._tcp(message, key)

    async def _udp(self, message: bytes, key: bytes) -> bytes:
        label = self.spec.label
        query_id = self._rng.randrange(0x10000)
        outgoing = replace_id(message, query_id)
        with trio.socket.socket(self._family, socket.SOCK_DGRAM) as sock:
            try:
                # connect() binds a random ephemeral port and filters what we receive.
                await sock.connect((self.spec.host, self.spec.port))
                await sock.send(outgoing)
            except OSError as exc:
                raise UpstreamConnectError(f"{label}: cannot send: {_reason(exc)}") from exc
            wait = RETRANSMIT_AFTER
            while True:
                with trio.move_on_after(wait):
                    while True:
                        try:
                            data = await sock.recv(_RECEIVE_SIZE)
                        except OSError as exc:
                            # ICMP port unreachable shows up here on a connected socket.
                            raise UpstreamConnectError(f"{label}: {_reason(exc)}") from exc
                        if _is_answer(data, query_id, key):
                            return data
                try:
                    await sock.send(outgoing)
                except OSError as exc:
                    raise UpstreamConnectError(f"{label}: cannot send: {_reason(exc)}") from exc
                wait *= 2

    async def _tcp(self, message: bytes, key: bytes) -> bytes:
        label = self.spec.label
        query_id = self._rng.randrange(0x10000)
        try:
            stream = await trio.open_tcp_stream(self.spec.host, self.spec.port)
        except OSError as exc:
            raise UpstreamConnectError(f"{label}: TCP connect failed: {_reason(exc)}") from exc
        async with stream:
            decoder = FrameDecoder()
            try:
                await stream.send_all(frame(replace_id(message, query_id)))
                while True:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        raise UpstreamClosed(f"{label}: TCP connection closed before the answer")
                    decoder.feed(data)
                    answer = decoder.next_message()
                    if answer is not NEED_DATA:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamClosed(f"{label}: TCP connection broke: {exc}") from exc
            except WireError as exc:
                raise UpstreamProtocolError(f"{label}: {exc}") from exc
        # On our own connection nobody else can slip a message in: a wrong one is a broken
        # resolver, not a forgery to sit out.
        if not _is_answer(answer, query_id, key):
            raise UpstreamProtocolError(f"{label}: TCP answer does not match the query")
        return answer


def _is_answer(data: bytes, query_id: int, key: bytes) -> bool:
    return len(data) >= HEADER_SIZE and message_id(data) == query_id and answer_matches(data, key)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
