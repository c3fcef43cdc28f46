"""When to ask the next upstream too, while the first is still thinking: :class:`Hedger`.

A query that its first upstream has not answered within a budget is hedged: asked of the next
upstream as well, the first answer winning (the group runs the hedge). The budget is the first
upstream's own recent p95 latency, within bounds, or a fixed ``--hedge-after``. One background
task keeps every query's due time in a heap and starts the hedges that fall due, rather than a
timer (a cancel scope and a deadline) per query.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Final, Generic, NoReturn, TypeVar

import trio

from dot_proxy.core.health import Health

__all__ = ["HEDGE_FLOOR", "RESOLUTION", "TICK", "Hedger"]

# The least a hedge waits, and what it waits for an upstream with no latency measured yet. A
# learned p95 can be a few milliseconds (a nearby upstream answering from its cache): a budget
# that short would hedge at every hiccup of ours or of the network, and each hedge is one more
# query for the upstreams. 0.1 s is well above such jitter and well below any deadline.
HEDGE_FLOOR: Final = 0.1
# How late a hedge may start: hedges due within this of the first one due start together, in
# one wake-up. Under load a hedge falls due every few hundred µs; a wake-up each costs a cancel
# scope and a deadline per sleep (docs/performance.md). 5 ms late is 5% of the least budget.
RESOLUTION: Final = 0.005
# The longest the hedger sleeps between looks. A query watched while it sleeps may fall due
# before its wake-up (another upstream's budget is shorter), and nothing wakes it for that one:
# such a hedge starts at most this late.
TICK: Final = 0.02

T = TypeVar("T")


class Hedger(Generic[T]):
    """Calls ``start(query)`` for each watched query once its budget has run out.

    ``start`` decides whether a hedge still makes sense (the query may have been answered
    meanwhile) and starts it. ``hedge_after`` is a fixed budget, None to learn it from the
    first upstream's latency (between :data:`HEDGE_FLOOR` and ``ceiling``, which the group
    sets to half the deadline: a hedge started later has little time left), 0 for none.

    Resource handling: :meth:`run` is the background task, in the group's nursery.
    """

    __slots__ = ("_ceiling", "_count", "_due", "_fixed", "_lot", "_start")

    def __init__(
        self, start: Callable[[T], None], *, hedge_after: float | None, ceiling: float
    ) -> None:
        self._start = start
        self._fixed = hedge_after
        self._ceiling = ceiling
        self._due: list[tuple[float, int, T]] = []
        self._count = 0  # a tie-breaker, so that the heap never compares two queries
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def enabled(self) -> bool:
        """Whether any query is ever hedged (``--hedge-after 0`` says no)."""
        return self._fixed != 0

    def watch(self, query: T, first: Health, now: float) -> None:
        """Hedge ``query``, asked of an upstream with health ``first`` at ``now``, if it is
        still unanswered when its budget runs out."""
        budget = (
            self._fixed
            if self._fixed is not None
            else first.hedge_budget(floor=HEDGE_FLOOR, ceiling=self._ceiling)
        )
        self._count += 1
        heapq.heappush(self._due, (now + budget, self._count, query))
        if len(self._due) == 1:
            self._lot.unpark()

    async def run(self) -> NoReturn:
        """Start every hedge that falls due, until cancelled."""
        due = self._due
        while True:
            if not due:
                await self._lot.park()
                continue
            now = trio.current_time()
            while due and due[0][0] <= now:
                self._start(heapq.heappop(due)[2])
            if due:
                wake_at = max(due[0][0], now + RESOLUTION)
                await trio.sleep_until(min(wake_at, now + TICK))
