"""What must hold for every input of the fuzz target, checked against dnspython."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

import dns.message
import dns.rcode

from dot_proxy.core.message import Query, parse_query
from dot_proxy.errors import WireError
from dot_proxy.handler import ServerStats
from fuzz.cases import Case
from fuzz.fake_upstreams import parses

__all__ = ["TIMEOUT", "InvariantViolation", "Outcome", "check", "udp_limit"]

TIMEOUT: Final = 5.0  # the proxy's deadline in every run (its default)
# Anything past the deadline the query path may still take: none. Cancellation is delivered at
# the deadline and the SERVFAIL is built without awaiting (virtual time, so exact).
DEADLINE_SLACK: Final = 1e-6
CLASSIC_UDP_LIMIT: Final = 512
_ERROR_RCODES: Final = frozenset({dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP})
_HEADER = struct.Struct("!HHHHHH")
_QR: Final = 0x8000


class InvariantViolation(AssertionError):
    """The query path broke one of the invariants in :func:`check` (a bug in dot-proxy)."""


@dataclass(slots=True)
class Outcome:
    """What one run produced, for :func:`check`."""

    answer: bytes | None
    elapsed: float  # virtual seconds inside QueryHandler.answer
    stats: ServerStats
    upstream_answers: tuple[bytes, ...] = ()  # every message the fake upstreams sent


def check(case: Case, outcome: Outcome) -> None:
    """Raise :class:`InvariantViolation` unless the run kept every invariant.

    - no bug inside the handler (``ServerStats.errors``: an exception it had to catch);
    - the answer came within the one deadline;
    - the answer, if any, is bytes that dnspython reads, unless an upstream sent bytes it
      cannot read (with the client's ID) or the client's own question is one it cannot read;
    - a message shorter than a header gets no answer; otherwise the answer has the query's ID;
    - over UDP it fits the client's limit (512, or the EDNS payload size);
    - a FORMERR, NOTIMP or SERVFAIL answer to a query that ``parse_query`` accepted carries
      that query's question.
    """
    message, answer = case.message, outcome.answer
    if outcome.stats.errors:
        _fail(case, "the handler caught an unexpected exception (a bug, answered SERVFAIL)")
    if outcome.elapsed > TIMEOUT + DEADLINE_SLACK:
        _fail(case, f"answered after {outcome.elapsed:.6f} s, past the {TIMEOUT:g} s deadline")
    if answer is None:
        return
    if not isinstance(answer, bytes):
        _fail(case, f"answer is {type(answer).__name__}, not bytes")
    if len(message) < _HEADER.size:
        _fail(case, "answered a message shorter than a header (nothing to answer to)")
    if len(answer) < _HEADER.size:
        _fail(case, f"answer of {len(answer)} bytes is shorter than a header")
    if _question_readable(message) and _readable_as_ours(outcome.upstream_answers, message):
        try:
            dns.message.from_wire(answer)
        except Exception as exc:
            _fail(case, f"dnspython cannot read the answer: {exc!r}; answer {answer.hex()}")
    if answer[:2] != message[:2]:
        _fail(case, f"answer ID {answer[:2].hex()} is not the query's {message[:2].hex()}")
    if case.udp and len(answer) > (limit := udp_limit(message)):
        _fail(case, f"UDP answer of {len(answer)} bytes over the client's limit of {limit}")
    query = _parsed(message)
    if query is not None and answer[3] & 0x0F in _ERROR_RCODES:
        qdcount = (answer[4] << 8) | answer[5]
        echoed = answer[_HEADER.size : _HEADER.size + len(query.question)]
        if qdcount != 1 or echoed.lower() != query.question.lower():
            _fail(case, f"rcode {answer[3] & 0x0F} answer does not echo the question")


def _readable_as_ours(upstream_answers: Sequence[bytes], message: bytes) -> bool:
    """Whether dnspython reads every upstream answer once it carries the client's ID.

    The ID, not the answer as sent: a compression pointer into the header (offset 0) reads
    the ID as a label, so the ID rewrite every forwarder does can turn a readable name into
    garbage (fuzz/regressions/echo-pointer-into-header). That is the upstream's nonsense.
    """
    return all(parses(message[:2] + answer[2:]) for answer in upstream_answers)


def udp_limit(message: bytes) -> int:
    """The largest UDP answer the client accepts, as dnspython reads its query (RFC 6891 §6.2.5)."""
    try:
        request = dns.message.from_wire(message)
    except Exception:
        query = _parsed(message)
        return CLASSIC_UDP_LIMIT if query is None else query.udp_limit
    if request.edns < 0:
        return CLASSIC_UDP_LIMIT
    return max(CLASSIC_UDP_LIMIT, int(request.payload))


def _parsed(message: bytes) -> Query | None:
    try:
        return parse_query(message)
    except WireError:
        return None


def _question_readable(message: bytes) -> bool:
    """Whether dnspython reads the client's header and question (what an error answer echoes)."""
    if len(message) < _HEADER.size:
        return True
    msg_id, flags, qdcount, *_ = _HEADER.unpack_from(message)
    if qdcount != 1:
        return True  # an error answer then echoes no question
    try:
        end = _question_end(message)
    except WireError:
        return True
    return parses(_HEADER.pack(msg_id, flags | _QR, 1, 0, 0, 0) + message[_HEADER.size : end])


def _question_end(message: bytes) -> int:
    offset = _HEADER.size
    while True:
        if offset >= len(message):
            raise WireError("name runs past the end", rcode=None)
        label = message[offset]
        if label == 0:
            end = offset + 5
            if end > len(message):
                raise WireError("question runs past the end", rcode=None)
            return end
        if label > 63:
            raise WireError("not a plain label", rcode=None)
        offset += 1 + label


def _fail(case: Case, what: str) -> NoReturn:
    raise InvariantViolation(
        f"{what}\n  case: udp={case.udp} padding={case.padding} policy={case.policy} "
        f"hedge_after={case.hedge_after} modes={[mode.name for mode in case.modes]}\n"
        f"  query: {case.message.hex()}"
    )
