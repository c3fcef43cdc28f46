"""Down upstreams are probed on their own schedule, and their ups and downs are logged once.

The issue (17): with both default upstreams unreachable, probes were seen at +1.25 s and +2.5 s
and then none for 17 s, while every client query logged two warnings. Each client query that
tried a down upstream as a last resort counted as a probe that failed: it doubled the backoff
and pushed the next probe back, so under steady traffic the probes stopped; and every failed
connect logged a warning. Covered, on virtual time with a fake ``connect`` that refuses or
accepts: probes come 1, 2, 4, 8 ... s apart whatever the client traffic; an upstream going
down and coming back is logged once each, with the reason, whether a probe or a client query
finds it back; a flapping upstream is logged at most once a minute, and a down state that was
not said is said when the minute is over; client queries log no warning of their own.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import dns.message
import pytest
import trio
import trio.testing

from dot_proxy.config import Config, parse_upstream
from dot_proxy.core.health import ALL_DOWN_PROBE_EVERY
from dot_proxy.core.message import parse_query
from dot_proxy.errors import UpstreamError
from dot_proxy.upstream.group import (
    PROBE_INTERVAL,
    UpstreamGroup,
    open_upstream_group,
    run_upstream_group,
)
from dot_proxy.upstream.health_log import REPEAT_AFTER, HealthLog
from tests.fakes import FakeConnect

FIRST, SECOND = 8531, 8532


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def two_upstreams() -> Config:
    return Config(
        upstreams=(
            parse_upstream(f"127.0.0.1:{FIRST}#dns.test"),
            parse_upstream(f"127.0.0.1:{SECOND}#dns.test"),
        )
    )


@asynccontextmanager
async def group_of_two(nursery: trio.Nursery) -> AsyncIterator[tuple[UpstreamGroup, FakeConnect]]:
    connect = FakeConnect(nursery)
    async with open_upstream_group(two_upstreams(), connect=connect) as group:
        yield group, connect


async def ask(group: UpstreamGroup, label: str) -> bytes | None:
    """One client query through the group; the answer, or None when it failed."""
    wire = dns.message.make_query(f"{label}.probe.test.", "A").to_wire()
    try:
        with trio.fail_after(5):
            return await group.resolve(wire, parse_query(wire).question_key)
    except UpstreamError:
        return None


def probes_of(connect: FakeConnect, port: int, asked: Iterable[float]) -> list[float]:
    """When the prober tried ``port``: every attempt but those of client queries (each tries
    a down upstream at once, at the moment it was asked, as a last resort)."""
    asked = set(asked)
    return [at for at in connect.attempts.get(port, []) if at not in asked]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("every", [None, 0.3, 1.0], ids=["no-traffic", "every-0.3s", "every-1s"])
async def test_probes_come_1_2_4_8_seconds_apart_whatever_the_client_traffic(
    clock: trio.testing.MockClock, nursery: trio.Nursery, every: float | None
) -> None:
    async with group_of_two(nursery) as (group, connect):
        connect.refusing = {FIRST: True, SECOND: True}
        asked = [trio.current_time()]
        assert await ask(group, "first") is None  # both refuse: both down at t=0
        until = trio.current_time() + 20
        await trio.sleep(0.05)  # client queries off the prober's beat: their attempts differ
        while trio.current_time() < until:
            if every is None:
                await trio.sleep_until(until)
                break
            await trio.sleep(every)
            asked.append(trio.current_time())
            assert await ask(group, f"q{len(asked)}") is None
        for port in (FIRST, SECOND):
            probes = probes_of(connect, port, asked)
            # Each probe when the one before failed plus the backoff, 1 s after the first
            # failure, then 2, 4 and 8 s apart: a prober tick late at most each time.
            waits = [b - a for a, b in zip([asked[0], *probes], probes, strict=False)]
            assert len(waits) == 4, (port, probes)
            for wait, backoff in zip(waits, [1, 2, 4, 8], strict=True):
                assert backoff <= wait <= backoff + PROBE_INTERVAL + 1e-9, (port, waits)


async def test_down_and_back_are_logged_once_each_and_client_queries_log_nothing(
    clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dot_proxy")
    async with group_of_two(nursery) as (group, connect):
        connect.refusing = {FIRST: True, SECOND: True}
        for index in range(40):  # 20 s of queries that fail on both
            assert await ask(group, f"q{index}") is None
            await trio.sleep(0.5)
        assert warnings(caplog) == [
            "127.0.0.1:8531#dns.test is down (connect failed: refused (fake)); "
            "probing it in 1 s, then less and less often",
            "127.0.0.1:8532#dns.test is down (connect failed: refused (fake)); "
            "probing it in 1 s, then less and less often",
        ]
        caplog.clear()

        # The second comes back; the next client query finds it, long before its probe.
        connect.refusing[SECOND] = False
        assert await ask(group, "back") is not None
        assert not group.health[1].down
        assert trio.current_time() < group.health[0].next_probe  # no probe did it
        assert warnings(caplog) == ["127.0.0.1:8532#dns.test answers again"]
        caplog.clear()

        # The first comes back too: its probe finds it, with no client query in sight.
        connect.refusing[FIRST] = False
        await trio.sleep(group.health[0].next_probe - trio.current_time() + PROBE_INTERVAL)
        assert not group.health[0].down
        assert warnings(caplog) == ["127.0.0.1:8531#dns.test answers again"]


@pytest.fixture
def said(caplog: pytest.LogCaptureFixture) -> HealthLog:
    """The log of one upstream that went down at 0 s ("reset") and came back at 2 s."""
    caplog.set_level(logging.WARNING, logger="dot_proxy")
    said = HealthLog(["up.test"])
    said.went_down(0, 0.0, "reset", probe_in=1.0)
    said.came_back(0, 2.0)
    assert warnings(caplog) == [
        "up.test is down (reset); probing it in 1 s, then less and less often",
        "up.test answers again",
    ]
    return said


def test_a_flapping_upstream_is_logged_at_most_once_a_minute(
    said: HealthLog, caplog: pytest.LogCaptureFixture
) -> None:
    for at in range(10, 50, 10):  # down and back four times more, within the minute
        said.went_down(0, float(at), f"reset {at}", probe_in=1.0)
        said.came_back(0, at + 2.0)
        said.tick(0, at + 3.0, down=False, probe_in=0.0)
    said.went_down(0, 55.0, "refused", probe_in=1.0)
    assert warnings(caplog) == []  # all within the minute of the first "down"
    # The minute is over: it is still down, and that is said, with what was held back.
    said.tick(0, REPEAT_AFTER, down=True, probe_in=0.5)
    assert warnings(caplog) == [
        "up.test is down (refused; went down 5 times in the last 60 s); "
        "probing it in 0.5 s, then less and less often"
    ]
    caplog.clear()
    said.came_back(0, 61.0)
    said.tick(0, 200.0, down=False, probe_in=0.0)
    assert warnings(caplog) == ["up.test answers again"]


def test_flaps_that_ended_up_are_summed_up_when_the_minute_is_over(
    said: HealthLog, caplog: pytest.LogCaptureFixture
) -> None:
    said.went_down(0, 10.0, "closed", probe_in=1.0)
    said.came_back(0, 12.0)
    said.tick(0, 30.0, down=False, probe_in=0.0)
    assert warnings(caplog) == []  # not yet
    said.tick(0, REPEAT_AFTER, down=False, probe_in=0.0)
    assert warnings(caplog) == [
        "up.test went down and came back 1 more times in the last 60 s (last: closed)"
    ]


async def test_with_every_upstream_down_probes_come_at_least_every_30_seconds(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    # Nothing to spare a down upstream for when none is up, and no client queries come to a
    # replica that /readyz says is not ready: the backoff's 5-minute cap would keep it out for
    # minutes after the upstreams came back.
    async with group_of_two(nursery) as (group, connect):
        connect.refusing = {FIRST: True, SECOND: True}
        start = trio.current_time()
        assert await ask(group, "first") is None
        await trio.sleep(600)
        for port in (FIRST, SECOND):
            probes = probes_of(connect, port, [start])
            gaps = [b - a for a, b in itertools.pairwise(probes)]
            assert max(gaps) <= ALL_DOWN_PROBE_EVERY + PROBE_INTERVAL + 1e-9, gaps
            assert max(gaps) >= 16  # the backoff still grows up to there


async def test_with_one_upstream_up_the_down_one_backs_off_past_30_seconds(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async with group_of_two(nursery) as (group, connect):
        connect.refusing = {FIRST: True, SECOND: False}
        start = trio.current_time()
        assert await ask(group, "first") is not None
        await trio.sleep(600)
        probes = probes_of(connect, FIRST, [start])
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert max(gaps) >= 64, gaps  # 1, 2, 4 ... 128, 256: RFC 7858 §3.1, no hammering


async def test_an_upstream_down_when_its_group_is_replaced_is_said_to_come_back(
    clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # A reload builds a new group on the health records of the old one (upstream.registry):
    # the new group's log must know what the old one said, or an upstream down at the reload
    # would have "down" as the log's last word after it came back.
    caplog.set_level(logging.WARNING, logger="dot_proxy")
    async with group_of_two(nursery) as (group, connect):
        connect.refusing = {FIRST: True, SECOND: False}
        for index in range(4):
            await ask(group, f"q{index}")
        assert group.health[0].down
        caplog.clear()
        async with run_upstream_group(
            group.upstreams, two_upstreams(), health=group.health
        ) as replacement:
            connect.refusing[FIRST] = False
            await trio.sleep(
                replacement.health[0].next_probe - trio.current_time() + PROBE_INTERVAL
            )
            assert not replacement.health[0].down
        assert warnings(caplog) == ["127.0.0.1:8531#dns.test answers again"]


async def test_groups_that_share_health_records_probe_a_down_upstream_once(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    # A reload's new group and the old one draining (or the default group and a --forward
    # zone's listing the same upstream) share its health record: one probe at a time, on one
    # schedule, not one per group.
    async with group_of_two(nursery) as (group, connect):
        connect.refusing = {FIRST: True, SECOND: True}
        asked = [trio.current_time()]
        assert await ask(group, "first") is None  # both down at t=0
        async with run_upstream_group(group.upstreams, two_upstreams(), health=group.health):
            await trio.sleep(20)
        for port in (FIRST, SECOND):
            probes = probes_of(connect, port, asked)
            assert len(probes) == 4, (port, probes)  # at about 1, 3, 7 and 15 s
            assert len(set(probes)) == len(probes)
