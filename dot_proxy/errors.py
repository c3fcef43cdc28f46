"""The exception tree: one root, translated once at each boundary.

A rule for every contributor: **an exception that is kept, stored in an object to be raised
later (a connection's error, the one a retired connection hands its queries, a race's, a
writer's), goes through** :func:`fresh` **where it is stored and where it is raised.** The
proxy runs the cyclic garbage collector rarely (``cli.GC_THRESHOLDS``), because answering
makes no reference cycles; a kept exception raised as is would make one per raise (its
traceback holds the raising frame, and the frame holds the object that keeps the exception),
and failing queries would pile memory up until the next full pass. ``tests/test_no_cycles.py``
fails when a failure path leaves a cycle of ours.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = [
    "ConfigError",
    "DotProxyError",
    "RaceLost",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTLSError",
    "WireError",
    "fresh",
]


class DotProxyError(Exception):
    """Root of every error dot-proxy raises on purpose."""


class ConfigError(DotProxyError):
    """A flag, environment variable or default that cannot be used.

    The message names the setting and the problem; the CLI prints it on one line and exits 2.
    """


class WireError(DotProxyError):
    """A message that cannot be handled as DNS.

    ``rcode`` is what to answer with (FORMERR, NOTIMP, ...), or ``None`` when the message is too
    broken to answer at all and must be dropped.
    """

    def __init__(self, message: str, *, rcode: int | None) -> None:
        super().__init__(message)
        self.rcode = rcode


class UpstreamError(DotProxyError):
    """An upstream resolver could not give an answer; the client gets SERVFAIL."""


class UpstreamConnectError(UpstreamError):
    """TCP connect failed (refused, unreachable, reset)."""


class UpstreamTLSError(UpstreamError):
    """The TLS handshake or the upstream's authentication failed; nothing was sent."""


class UpstreamProtocolError(UpstreamError):
    """The upstream broke RFC 7858 framing or sent something that is not DNS."""


class UpstreamClosed(UpstreamError):
    """The connection closed or broke before the answer arrived; the query may be retried."""


class RaceLost(UpstreamError):
    """Another attempt at the same query answered first; its answer is in ``race.answer``."""


_Kept = TypeVar("_Kept", bound=BaseException)


def fresh(error: _Kept) -> _Kept:
    """A new error of the same type and message, with no traceback, cause or context.

    For an error kept to be raised later (see the module's docstring): it is stored as a copy,
    and raised as one. Raising one object in the tasks of many queries strings each raising
    frame onto its traceback, and frames that hold the object make reference cycles that only
    the cyclic collector frees, and that late (cli.GC_THRESHOLDS). Only for errors built from
    their message alone (ours but :class:`WireError`, and trio's).
    """
    return type(error)(*error.args)
