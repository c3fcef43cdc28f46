"""Waiter and WaitLine: the wake-ups under every query's wait for its answer and for room.

Covered: a wake with nobody waiting is kept for the next wait; a wake reaches every task on a
waiter; a line hands out turns first come, first served, one per turn; a waiter woken by
someone else leaves the line without a turn; a cancelled waiter leaves the line; ``wake_all``
gives everyone a turn.
"""

from __future__ import annotations

import trio
import trio.testing

from dot_proxy.upstream.waiting import Waiter, WaitLine


async def test_a_wake_with_nobody_waiting_is_kept_for_the_next_wait() -> None:
    waiter = Waiter()
    waiter.wake()
    with trio.fail_after(1):
        await waiter.wait()  # at once


async def test_a_wake_reaches_every_task_on_a_waiter(nursery: trio.Nursery) -> None:
    waiter, woken = Waiter(), []

    async def wait(name: str) -> None:
        await waiter.wait()
        woken.append(name)

    for name in ("query", "hedge"):
        nursery.start_soon(wait, name)
    await trio.testing.wait_all_tasks_blocked()
    waiter.wake()
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(woken) == ["hedge", "query"]


class Queue:
    """Tasks waiting in one line, each recording what woke it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.line = WaitLine()
        self.nursery = nursery
        self.waiters: dict[str, Waiter] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.woken: list[tuple[str, bool]] = []

    async def join(self, *names: str) -> None:
        for name in names:
            self.waiters[name] = Waiter()
            self.nursery.start_soon(self._wait, name)
            await trio.testing.wait_all_tasks_blocked()  # in this order

    async def _wait(self, name: str) -> None:
        with trio.CancelScope() as self.scopes[name]:
            self.woken.append((name, await self.line.wait(self.waiters[name])))


async def test_turns_go_first_come_first_served_one_at_a_time(nursery: trio.Nursery) -> None:
    queue = Queue(nursery)
    await queue.join("a", "b", "c")
    queue.line.wake_next()
    await trio.testing.wait_all_tasks_blocked()
    assert queue.woken == [("a", True)]
    queue.line.wake_next()
    await trio.testing.wait_all_tasks_blocked()
    queue.line.wake_next()
    await trio.testing.wait_all_tasks_blocked()
    assert queue.woken == [("a", True), ("b", True), ("c", True)]
    queue.line.wake_next()  # nobody waits: nothing happens


async def test_a_waiter_woken_by_someone_else_leaves_without_a_turn(
    nursery: trio.Nursery,
) -> None:
    queue = Queue(nursery)
    await queue.join("a", "b")
    queue.waiters["b"].wake()  # say, its query's hedge answered
    await trio.testing.wait_all_tasks_blocked()
    assert queue.woken == [("b", False)]
    queue.line.wake_next()
    await trio.testing.wait_all_tasks_blocked()
    assert queue.woken == [("b", False), ("a", True)]


async def test_a_cancelled_waiter_still_in_line_just_leaves(nursery: trio.Nursery) -> None:
    queue = Queue(nursery)
    await queue.join("a", "b")
    queue.scopes["a"].cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert queue.woken == []
    queue.line.wake_next()
    await trio.testing.wait_all_tasks_blocked()
    assert queue.woken == [("b", True)]


async def test_wake_all_gives_everyone_a_turn(nursery: trio.Nursery) -> None:
    queue = Queue(nursery)
    await queue.join("a", "b", "c")
    queue.line.wake_all()
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(queue.woken) == [("a", True), ("b", True), ("c", True)]
