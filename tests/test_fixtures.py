"""The opt-in fixtures of tests/conftest.py stay opt-in.

conftest's ``clock`` is a MockClock; pytest-trio runs a test on it only when the test names it.
If that ever changed (a pytest-trio release that looked further, a fixture made autouse), every
trio test would move to virtual time, and the ones that wait on a subprocess or on a real
socket peer outside trio would time out or pass for the wrong reason. These tests say so first.
"""

from __future__ import annotations

import trio
import trio.testing


async def test_a_test_that_does_not_name_clock_runs_on_real_time() -> None:
    assert not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


async def test_a_fixture_that_is_not_the_clock_leaves_real_time(hang_guard: None) -> None:
    assert not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


async def test_a_test_that_names_clock_runs_on_it(clock: trio.testing.MockClock) -> None:
    assert trio.lowlevel.current_clock() is clock
    assert clock.autojump_threshold == 0.01
    before = trio.current_time()
    await trio.sleep(3600)  # virtual: jumps there once every task has waited 10 ms
    assert trio.current_time() - before == 3600
