"""Hedger: each watched query is handed back once its budget has run out, and not before.

Covered on virtual time: the budget is the floor for an upstream with no latency measured, its
p95 within the floor and the ceiling once measured, or the fixed ``--hedge-after``; hedges due
close together start in one wake-up, none early and none later than the resolution; a query
watched while the hedger sleeps towards a later one still starts within a tick; ``0`` means
no hedging.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dot_proxy.core.health import Health
from dot_proxy.upstream.hedger import HEDGE_FLOOR, RESOLUTION, TICK, Hedger


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Started:
    """The hedger's ``start``: when each query was handed back."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def __call__(self, query: str) -> None:
        self.at[query] = trio.current_time()


def measured(p95: float) -> Health:
    health = Health()
    for _ in range(20):
        health.record_answer(0.0, p95)
    return health


async def run_hedger(
    nursery: trio.Nursery, *, hedge_after: float | None = None, ceiling: float = 2.5
) -> tuple[Hedger[str], Started]:
    started = Started()
    hedger = Hedger(started, hedge_after=hedge_after, ceiling=ceiling)
    nursery.start_soon(hedger.run)
    await trio.testing.wait_all_tasks_blocked()
    return hedger, started


@pytest.mark.parametrize(
    ("first", "budget"),
    [
        pytest.param(Health(), HEDGE_FLOOR, id="unmeasured-floor"),
        pytest.param(measured(0.002), HEDGE_FLOOR, id="fast-floor"),
        pytest.param(measured(0.3), 0.3, id="p95"),
        pytest.param(measured(4.0), 2.5, id="ceiling"),
    ],
)
async def test_the_learnt_budget(
    clock: trio.testing.MockClock, nursery: trio.Nursery, first: Health, budget: float
) -> None:
    hedger, started = await run_hedger(nursery)
    hedger.watch("query", first, trio.current_time())
    await trio.sleep(5)
    assert started.at["query"] == pytest.approx(budget)


async def test_a_fixed_budget(clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    hedger, started = await run_hedger(nursery, hedge_after=0.7)
    hedger.watch("query", measured(0.01), trio.current_time())
    await trio.sleep(5)
    assert started.at["query"] == pytest.approx(0.7)


async def test_zero_means_off() -> None:
    assert not Hedger(Started(), hedge_after=0, ceiling=2.5).enabled
    assert Hedger(Started(), hedge_after=None, ceiling=2.5).enabled


async def test_hedges_due_close_together_start_in_one_wake_up(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    hedger, started = await run_hedger(nursery)
    for index in range(20):  # 1 ms apart
        hedger.watch(f"q{index}", Health(), trio.current_time())
        await trio.sleep(0.001)
    await trio.sleep(1)
    for index in range(20):
        late = started.at[f"q{index}"] - (index * 0.001 + HEDGE_FLOOR)
        assert -1e-9 <= late <= RESOLUTION + 1e-9
    assert len(set(started.at.values())) <= 0.020 / RESOLUTION + 1


async def test_a_sooner_hedge_watched_while_the_hedger_sleeps_is_at_most_a_tick_late(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    hedger, started = await run_hedger(nursery)
    hedger.watch("slow", measured(2.0), trio.current_time())  # due at 2 s
    await trio.sleep(0.5)
    hedger.watch("quick", Health(), trio.current_time())  # due at 0.6 s, nobody woken
    await trio.sleep(3)
    assert started.at["slow"] == pytest.approx(2.0)
    assert 0.6 - 1e-9 <= started.at["quick"] <= 0.6 + TICK + 1e-9
