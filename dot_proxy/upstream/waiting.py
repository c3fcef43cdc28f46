"""Waking a query's task: :class:`Waiter`, and :class:`WaitLine`, a first-come-first-served line
of them (the pool's queue for a free slot).

Built on trio's low-level parking rather than an Event per wait: a query's task waits here on
every query's path, for its answer and sometimes for room.
"""

from __future__ import annotations

import trio

__all__ = ["WaitLine", "Waiter"]


class Waiter:
    """Where one query's task (or its few tasks: a query and its hedge) sleeps until woken.

    A wake wakes every task waiting; a wake with nobody waiting lets the next wait return at
    once, so a wake between a task's check of its state and its wait is never lost. Woken
    tasks re-check their state: a wake says only that something they may care about happened.
    """

    __slots__ = ("_waiters", "_woken")

    def __init__(self) -> None:
        self._waiters: list[trio.lowlevel.Task] = []
        self._woken = False

    def wake(self) -> None:
        """Wake the waiting tasks, or the next one to wait."""
        waiters = self._waiters
        if not waiters:
            self._woken = True
            return
        for task in waiters:
            trio.lowlevel.reschedule(task)
        waiters.clear()

    async def wait(self) -> None:
        """Sleep until the next :meth:`wake` (at once if one came since the last wait)."""
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


class WaitLine:
    """Waiters in arrival order, woken one per turn (:meth:`wake_next`) or all at once.

    One turn wakes one waiter: waking them all for every turn would cost each turn a wake-up
    per waiter, which under overload (an upstream freezes and its pool fills) is what keeps a
    proxy from ever catching up. A waiter may also be woken by someone else (its query's race):
    it then leaves the line without a turn.
    """

    __slots__ = ("_line",)

    def __init__(self) -> None:
        self._line: dict[Waiter, None] = {}  # a dict as an ordered set

    async def wait(self, waiter: Waiter) -> bool:
        """Wait in line until ``waiter`` is woken; whether it was by a turn.

        A waiter that got a turn and does not use it hands it on with :meth:`wake_next`.
        Cancellation: the waiter leaves the line, and a turn it was handed goes to the next.
        """
        self._line[waiter] = None
        try:
            await waiter.wait()
        except BaseException:
            if self._line.pop(waiter, False) is False:  # out of line: it had been handed a turn
                self.wake_next()
            raise
        return self._line.pop(waiter, False) is False

    def wake_next(self) -> None:
        """Give the first in line a turn, if anyone waits."""
        line = self._line
        if line:
            waiter = next(iter(line))
            del line[waiter]
            waiter.wake()

    def wake_all(self) -> None:
        """Give everyone in line a turn (each looks again)."""
        waiters = list(self._line)
        self._line.clear()
        for waiter in waiters:
            waiter.wake()
