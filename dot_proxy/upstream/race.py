"""Where a query's task (and any hedge of it) waits for the first answer."""

from __future__ import annotations

import trio

__all__ = ["Race"]


class Race:
    """The attempts at one query, possibly on several upstreams at once (hedging).

    Every attempt's pending entry wakes the race's task when it completes; ``answer`` is set
    by whichever attempt wins, and the others then give up their queries (abandoned, so the
    connections stay healthy). A plain query is a race with one runner.

    Several tasks may wait on one race (a query and its hedge); a wake wakes them all, and a
    wake with nobody waiting lets the next wait return at once. Built on trio's low-level
    parking rather than an Event per wait: this is on every query's path.
    """

    __slots__ = ("_waiters", "_woken", "answer")

    def __init__(self) -> None:
        self._waiters: list[trio.lowlevel.Task] = []
        self._woken = False
        self.answer: bytes | None = None

    def wake(self) -> None:
        """Tell the waiting tasks that something they may care about happened."""
        waiters = self._waiters
        if not waiters:
            self._woken = True
            return
        for task in waiters:
            trio.lowlevel.reschedule(task)
        waiters.clear()

    async def wait(self) -> None:
        """Sleep until the next :meth:`wake` (callers re-check their state after it)."""
        if self._woken:
            self._woken = False
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        self._waiters.append(task)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
