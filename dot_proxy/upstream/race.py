"""The attempts at one query, and how each learns that another answered first: :class:`Race`."""

from __future__ import annotations

from dot_proxy.errors import RaceLost
from dot_proxy.upstream.waiting import Waiter

__all__ = ["Race", "race_lost"]


class Race(Waiter):
    """The attempts at one query, possibly on several upstreams at once (hedging).

    Every task working on the query waits on the race: for its answer on a connection, for a
    connection's handshake, for room in a pool. Whatever concerns the query wakes the race (an
    answer for one of its attempts, a failure, a hedge giving up); ``answer`` is set by the
    attempt that wins, and the others, woken, see it and give up with :class:`RaceLost`
    (abandoning their queries, so that the connections stay healthy). A query without hedging
    is a race with one runner.
    """

    __slots__ = ("answer",)

    def __init__(self) -> None:
        Waiter.__init__(self)  # not super(): a race is made per query
        self.answer: bytes | None = None


def race_lost(label: str) -> RaceLost:
    """What an attempt at ``label`` raises once another attempt has won."""
    return RaceLost(f"{label}: another upstream answered first")
