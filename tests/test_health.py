"""Upstream health and selection, pure: no event loop, the clock is a number passed in.

RFC 7858 §3.1 asks a client to remember servers that fail; the issue asks for a backoff from
about a second to a few minutes, a probe instead of client queries to find out whether a down
upstream is back, and never "every upstream down, so every query fails for minutes".
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dot_proxy.core.health import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    SAMPLES,
    TIMEOUTS_TO_DOWN,
    Health,
    Policy,
    order_upstreams,
)

rtts = st.floats(min_value=1e-4, max_value=10.0, allow_nan=False, allow_infinity=False)
times = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


def measured(*rtt_values: float) -> Health:
    health = Health()
    for rtt in rtt_values:
        health.record_answer(0.0, rtt)
    return health


def down_since(when: float) -> Health:
    health = Health()
    health.record_failure(when)
    assert health.down
    return health


def order(health: list[Health], policy: Policy = Policy.FAILOVER, turn: int = 0) -> list[int]:
    return order_upstreams(health, policy, turn=turn, rng=random.Random(0))


# --- latency: EWMA, p95, hedging budget ----------------------------------------------------------


def test_first_answer_sets_the_rtt_and_later_ones_move_it_by_a_fifth() -> None:
    health = Health()
    assert health.rtt is None
    health.record_answer(0.0, 0.100)
    assert health.rtt == pytest.approx(0.100)
    health.record_answer(0.0, 0.200)
    assert health.rtt == pytest.approx(0.100 + 0.2 * 0.100)
    health.record_answer(0.0, 0.020)
    assert health.rtt == pytest.approx(0.120 + 0.2 * (0.020 - 0.120))


@given(st.lists(rtts, min_size=1, max_size=200))
def test_ewma_stays_within_the_samples_and_follows_a_steady_latency(values: list[float]) -> None:
    health = measured(*values)
    assert health.rtt is not None
    assert min(values) - 1e-9 <= health.rtt <= max(values) + 1e-9
    assert health.answers == len(values)
    # A steady latency afterwards pulls the average to it (0.8**60 is about 1.5e-6).
    for _ in range(60):
        health.record_answer(0.0, 0.05)
    assert health.rtt == pytest.approx(0.05, abs=1e-4)


def test_p95_is_none_before_any_answer() -> None:
    assert Health().p95 is None


def test_p95_of_a_hundred_answers_ignores_the_slowest_few() -> None:
    # Only the last SAMPLES answers count: 100 answers, 64 of them kept. Feed in an order that
    # keeps 60 fast ones and 4 slow ones (3 of them outliers the p95 must look past).
    health = Health()
    for _ in range(100 - SAMPLES):
        health.record_answer(0.0, 9.0)  # overwritten by the ring of recent samples
    for _ in range(SAMPLES - 4):
        health.record_answer(0.0, 0.010)
    health.record_answer(0.0, 0.050)
    for _ in range(3):
        health.record_answer(0.0, 3.0)
    # 64 samples: rank int(64 * 0.95) = 60 of the sorted list is the 0.050 one.
    assert health.p95 == pytest.approx(0.050)


@given(st.lists(rtts, min_size=1, max_size=3 * SAMPLES))
def test_p95_is_a_recent_sample_with_95_percent_of_them_at_or_below_it(
    values: list[float],
) -> None:
    health = measured(*values)
    p95 = health.p95
    recent = values[-SAMPLES:]  # only the most recent answers count
    assert p95 in recent
    assert sum(1 for v in recent if v <= p95) >= 0.95 * len(recent)
    assert sum(1 for v in recent if v < p95) <= 0.95 * len(recent)


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        pytest.param([], 0.1, id="no-samples-floor"),
        pytest.param([0.001] * 20, 0.1, id="fast-upstream-floor"),
        pytest.param([0.3] * 20, 0.3, id="its-own-p95"),
        pytest.param([4.0] * 20, 2.5, id="slow-upstream-ceiling"),
    ],
)
def test_hedge_budget_is_the_p95_between_floor_and_ceiling(
    samples: list[float], expected: float
) -> None:
    health = measured(*samples)
    assert health.hedge_budget(floor=0.1, ceiling=2.5) == pytest.approx(expected)


@given(st.lists(rtts, max_size=100))
def test_hedge_budget_never_leaves_its_bounds(values: list[float]) -> None:
    budget = measured(*values).hedge_budget(floor=0.1, ceiling=2.5)
    assert 0.1 <= budget <= 2.5


# --- failures, backoff, probes -------------------------------------------------------------------


def test_a_refused_connection_or_tls_failure_marks_down_at_once() -> None:
    health = Health()
    health.record_failure(100.0)
    assert health.down
    assert health.backoff == BACKOFF_FIRST == 1.0
    assert health.next_probe == 101.0
    assert health.last_failure == 100.0


def test_backoff_doubles_from_one_second_to_the_cap_of_five_minutes() -> None:
    health = Health()
    health.record_failure(0.0)
    now = 0.0
    backoffs = [health.backoff]
    for _ in range(11):
        now = health.next_probe  # the probe, when it is due, fails again
        health.record_probe_failure(now)
        backoffs.append(health.backoff)
        assert health.next_probe == now + health.backoff
    assert backoffs == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert BACKOFF_CAP == 300.0


@given(st.lists(st.booleans(), min_size=1, max_size=60), times)
def test_backoff_is_bounded_and_never_shrinks_while_down(probes: list[bool], start: float) -> None:
    health = Health()
    previous = 0.0
    for step, probe in enumerate(probes):
        if probe:
            health.record_probe_failure(start + step)
        else:
            health.record_failure(start + step)
        assert previous <= health.backoff <= BACKOFF_CAP
        previous = health.backoff
    assert health.down


def test_a_query_failing_on_a_down_upstream_moves_no_probe() -> None:
    # Issue 17: client queries that tried a down upstream as a last resort each doubled the
    # backoff and pushed the probe back; under steady traffic the probes stopped.
    health = Health()
    health.record_failure(0.0)
    health.record_probe_failure(1.0)
    assert (health.backoff, health.next_probe) == (2.0, 3.0)
    for step in range(1, 20):
        health.record_failure(1.0 + step / 10, timeout=step % 2 == 0)
    assert (health.backoff, health.next_probe) == (2.0, 3.0)
    assert health.probe_due(3.0)
    assert health.last_failure == 2.9  # the latest, to order the down upstreams by
    assert health.failures == 21
    health.record_lost_race(2.95)
    assert (health.backoff, health.next_probe) == (2.0, 3.0)


def test_a_probe_that_fails_after_a_query_found_the_upstream_back_marks_it_down_anew() -> None:
    health = Health()
    health.record_failure(0.0)
    health.record_probe_failure(1.0)
    health.record_answer(1.5, 0.01)  # a client query found it back
    health.record_probe_failure(1.6)  # the probe in flight then fails
    assert health.down
    assert (health.backoff, health.next_probe) == (1.0, 2.6)


def test_probe_is_due_only_when_down_and_the_backoff_has_passed() -> None:
    health = Health()
    assert not health.probe_due(0.0)  # healthy: no probes at all
    health.record_failure(10.0)
    assert not health.probe_due(10.0)
    assert not health.probe_due(10.999)
    assert health.probe_due(11.0)
    assert health.probe_due(500.0)
    health.record_answer(11.0, 0.01)
    assert not health.probe_due(500.0)


def test_timeouts_mark_down_only_after_three_in_a_row() -> None:
    # A timeout may be the name's fault (a slow authoritative server), not the upstream's.
    health = Health()
    for count in range(1, TIMEOUTS_TO_DOWN):
        health.record_failure(float(count), timeout=True)
        assert not health.down, count
        assert not health.probe_due(1e9)
    health.record_failure(10.0, timeout=True)
    assert TIMEOUTS_TO_DOWN == 3
    assert health.down
    assert health.backoff == 1.0
    assert health.next_probe == 11.0
    assert health.last_failure == 10.0


def test_an_answer_between_timeouts_breaks_the_run() -> None:
    health = Health()
    health.record_failure(1.0, timeout=True)
    health.record_failure(2.0, timeout=True)
    health.record_answer(3.0, 0.05)
    health.record_failure(4.0, timeout=True)
    health.record_failure(5.0, timeout=True)
    assert not health.down
    health.record_failure(6.0, timeout=True)
    assert health.down


def test_success_resets_failures_and_backoff() -> None:
    health = Health()
    health.record_failure(0.0)
    for step in range(1, 5):
        health.record_probe_failure(float(step))
    assert health.backoff == 16.0
    health.record_answer(20.0, 0.03)
    assert not health.down
    assert health.consecutive_failures == 0
    assert health.consecutive_timeouts == 0
    assert health.backoff == 0.0
    assert health.failures == 5  # the totals stay, for statistics
    # Down again later: the backoff starts over at one second, not at 32.
    health.record_failure(30.0)
    assert health.backoff == 1.0
    assert health.next_probe == 31.0


def test_soft_failures_do_not_mark_down() -> None:
    # SERVFAIL or REFUSED is an answer: the upstream is alive (dnsproxy #257).
    health = Health()
    for _ in range(50):
        health.record_soft_failure()
    assert not health.down
    assert health.soft_failures == 50
    assert health.consecutive_failures == 0


# --- order_upstreams -----------------------------------------------------------------------------


def test_failover_keeps_the_configured_order() -> None:
    health = [measured(0.5), measured(0.01), Health()]
    for turn in range(5):
        assert order(health, Policy.FAILOVER, turn) == [0, 1, 2]


def test_round_robin_rotates_by_turn() -> None:
    health = [Health(), Health(), Health()]
    orders = [order(health, Policy.ROUND_ROBIN, turn) for turn in range(6)]
    assert orders == [
        [0, 1, 2],
        [1, 2, 0],
        [2, 0, 1],
        [0, 1, 2],
        [1, 2, 0],
        [2, 0, 1],
    ]


def test_round_robin_rotates_only_among_healthy_upstreams() -> None:
    health = [Health(), down_since(5.0), Health()]
    firsts = Counter(order(health, Policy.ROUND_ROBIN, turn)[0] for turn in range(10))
    assert firsts == {0: 5, 2: 5}
    for turn in range(10):
        assert order(health, Policy.ROUND_ROBIN, turn)[-1] == 1


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=10_000))
def test_every_policy_gives_every_upstream_exactly_once(count: int, turn: int) -> None:
    health = [Health() for _ in range(count)]
    for policy in Policy:
        assert sorted(order(health, policy, turn)) == list(range(count))


def test_fastest_chooses_the_fastest_most_often() -> None:
    health = [measured(0.100), measured(0.010), measured(0.050)]
    rng = random.Random(853)
    orders = [order_upstreams(health, Policy.FASTEST, turn=t, rng=rng) for t in range(1000)]
    firsts = Counter(first for first, *_ in orders)
    # Weights 1/rtt²: 100, 10000 and 400, so the fastest leads about 95% of the time ...
    assert firsts[1] > 900
    # ... and the others still get a few queries, so their latency stays measured.
    assert firsts[0] > 0
    assert firsts[2] > 0
    assert firsts[2] > firsts[0]
    # After the first pick, the rest are in order of latency (the order hedges and failover
    # take).
    for ranking in orders:
        assert ranking[1:] == sorted(ranking[1:], key=lambda i: health[i].rtt or 0.0)


def test_fastest_tries_an_unmeasured_upstream_first() -> None:
    health = [measured(0.010), Health(), measured(0.001)]
    rng = random.Random(1)
    for turn in range(20):
        assert order_upstreams(health, Policy.FASTEST, turn=turn, rng=rng)[0] == 1


@pytest.mark.parametrize("policy", list(Policy))
def test_down_upstreams_come_last_least_recently_failed_first(policy: Policy) -> None:
    health = [down_since(30.0), Health(), down_since(10.0), Health(), down_since(20.0)]
    for turn in range(4):
        ranking = order(health, policy, turn)
        assert sorted(ranking[:2]) == [1, 3]
        assert ranking[2:] == [2, 4, 0]


@pytest.mark.parametrize("policy", list(Policy))
def test_all_down_the_least_recently_failed_is_tried_first(policy: Policy) -> None:
    health = [down_since(50.0), down_since(40.0), down_since(45.0)]
    assert order(health, policy) == [1, 2, 0]


@given(
    st.lists(
        st.one_of(st.none(), times),  # None: healthy; a time: down since then
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(list(Policy)),
    st.integers(min_value=0, max_value=1000),
)
def test_healthy_before_down_and_down_by_last_failure(
    failed_at: list[float | None], policy: Policy, turn: int
) -> None:
    health = [Health() if when is None else down_since(when) for when in failed_at]
    ranking = order(health, policy, turn)
    healthy = [i for i, when in enumerate(failed_at) if when is None]
    assert sorted(ranking) == list(range(len(health)))
    assert sorted(ranking[: len(healthy)]) == healthy
    tail = [health[i].last_failure for i in ranking[len(healthy) :]]
    assert tail == sorted(tail)


def test_lost_races_mark_a_wedged_upstream_down_without_counting_failures() -> None:
    health = Health()
    for count in range(1, TIMEOUTS_TO_DOWN):
        health.record_lost_race(float(count))
        assert not health.down
    health.record_lost_race(10.0)
    assert health.down
    assert health.next_probe == 10.0 + BACKOFF_FIRST
    assert health.failures == 0
    assert health.lost_races == TIMEOUTS_TO_DOWN


def test_an_answer_between_lost_races_keeps_the_upstream_up() -> None:
    health = Health()
    for now in range(10):
        health.record_lost_race(float(now))
        health.record_answer(float(now), 0.01)
    assert not health.down
