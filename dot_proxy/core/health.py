"""Upstream health and selection, pure: the clock is passed in as ``now``.

RFC 7858 §3.1 asks a client to remember servers that fail and not to hammer them; users ask for
resolution that never goes down (dnsproxy #354, stubby #105). Each upstream has a
:class:`Health`: a latency EWMA and recent samples (for the hedging budget), consecutive
failures, and whether it is down with an exponential backoff until its next probe.

The probes keep their own schedule: only a failed probe doubles the backoff and sets the next
one. A client query that tries a down upstream as a last resort and fails counts as a failure,
but moves neither: if it did, steady client traffic would push the next probe back with every
query, and an upstream that came back would be found only by luck.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from dot_proxy.core.metrics import Histogram

__all__ = ["Health", "Policy", "order_upstreams"]

EWMA_WEIGHT = 0.2
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 300.0
# When every upstream of a group is down there is nothing to spare them for: each is probed
# at least this often, so that the proxy (and an orchestrator reading /readyz, which stops
# sending it queries meanwhile) finds them back within half a minute, not five.
ALL_DOWN_PROBE_EVERY = 30.0
SAMPLES = 64
# A timeout may be the name's fault (a slow authoritative server), not the upstream's: only a
# run of them marks an upstream down. Refused connections and TLS failures do at once.
TIMEOUTS_TO_DOWN = 3


class Policy(enum.Enum):
    """How the next query picks among healthy upstreams (``--upstream-policy``)."""

    FAILOVER = "failover"
    ROUND_ROBIN = "round-robin"
    FASTEST = "fastest"


@dataclass(slots=True)
class Health:
    """What the proxy has learnt about one upstream."""

    rtt: float | None = None  # EWMA of answer times, seconds
    consecutive_failures: int = 0
    consecutive_timeouts: int = 0
    down: bool = False
    next_probe: float = 0.0
    backoff: float = 0.0
    last_failure: float = float("-inf")
    answers: int = 0
    failures: int = 0
    timeouts: int = 0  # of the failures
    soft_failures: int = 0
    lost_races: int = 0
    rtt_histogram: Histogram = field(default_factory=Histogram)
    # A background probe is out now: no second one (groups that share this record included).
    probing: bool = False
    _samples: list[float] = field(default_factory=list)
    _next_sample: int = 0
    _p95: float | None = None

    def record_answer(self, now: float, rtt: float) -> None:
        """A valid answer arrived after ``rtt`` seconds: the upstream is up."""
        self.answers += 1
        self.rtt_histogram.observe(rtt)
        self.rtt = rtt if self.rtt is None else self.rtt + EWMA_WEIGHT * (rtt - self.rtt)
        if len(self._samples) < SAMPLES:
            self._samples.append(rtt)
        else:
            self._samples[self._next_sample] = rtt
            self._next_sample = (self._next_sample + 1) % SAMPLES
        if self.answers % 16 == 1:
            self._p95 = None  # recomputed lazily, not on every answer
        self.consecutive_failures = 0
        self.consecutive_timeouts = 0
        self.down = False
        self.backoff = 0.0

    def record_soft_failure(self) -> None:
        """The upstream answered SERVFAIL or REFUSED: alive, but this answer is not kept."""
        self.soft_failures += 1

    def record_lost_race(self, now: float) -> None:
        """A hedge answered before this upstream, which was asked first.

        Not a failure (it may answer yet), but as telling as a timeout: a run of them marks a
        wedged upstream down, which hedging would otherwise hide forever at the cost of the
        hedge budget on every query.
        """
        self.lost_races += 1
        self.consecutive_timeouts += 1
        if self.consecutive_timeouts >= TIMEOUTS_TO_DOWN:
            self._mark_down(now)

    def record_failure(self, now: float, *, timeout: bool = False) -> None:
        """A query failed: refused, TLS failure, broken connection, or timeout.

        Marks the upstream down (at once, or after a run of timeouts), with its first probe
        :data:`BACKOFF_FIRST` later; on an upstream already down it changes no probe.
        """
        self.failures += 1
        self.consecutive_failures += 1
        self.last_failure = now
        if timeout:
            self.timeouts += 1
            self.consecutive_timeouts += 1
            if self.consecutive_timeouts < TIMEOUTS_TO_DOWN:
                return
        self._mark_down(now)

    def record_probe_failure(self, now: float) -> None:
        """A background probe failed: the next comes after twice the wait, up to the cap."""
        self.failures += 1
        self.consecutive_failures += 1
        self.last_failure = now
        self.backoff = min(BACKOFF_CAP, self.backoff * 2) if self.down else BACKOFF_FIRST
        self.down = True
        self.next_probe = now + self.backoff

    def _mark_down(self, now: float) -> None:
        self.last_failure = now
        if not self.down:
            self.backoff = BACKOFF_FIRST
            self.down = True
            self.next_probe = now + self.backoff

    def probe_due(self, now: float, *, all_down: bool = False) -> bool:
        """Whether a background probe should be sent now; ``all_down`` when no upstream of
        the group is up (then at most :data:`ALL_DOWN_PROBE_EVERY` after the last failure)."""
        if not self.down or self.probing:
            return False
        if now >= self.next_probe:
            return True
        return all_down and now >= self.last_failure + ALL_DOWN_PROBE_EVERY

    @property
    def p95(self) -> float | None:
        """95th percentile of recent answer times, or None before any answer."""
        if self._p95 is None and self._samples:
            ordered = sorted(self._samples)
            self._p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        return self._p95

    def hedge_budget(self, *, floor: float, ceiling: float) -> float:
        """How long to wait for this upstream before asking the next one too."""
        p95 = self.p95
        return max(floor, min(ceiling, p95 if p95 is not None else floor))


def order_upstreams(
    health: Sequence[Health],
    policy: Policy,
    *,
    turn: int,
    rng: random.Random,
) -> list[int]:
    """Indexes of the upstreams to try for one query, in order.

    Healthy upstreams come first, ordered by ``policy``; down ones follow, least recently
    failed first, as a last resort — so when every upstream is down, the query still goes to
    the one most likely to have recovered instead of failing for minutes.
    """
    down: list[int] = []
    for record in health:
        if record.down:
            up = [index for index, record in enumerate(health) if not record.down]
            down = sorted(
                (index for index, record in enumerate(health) if record.down),
                key=lambda index: health[index].last_failure,
            )
            break
    else:
        up = list(range(len(health)))  # all up, the usual case: nothing to sort (every query)
    if len(up) > 1:
        if policy is Policy.ROUND_ROBIN:
            start = turn % len(up)
            up = up[start:] + up[:start]
        elif policy is Policy.FASTEST:
            up = _fastest_first(up, health, rng)
    return up + down if down else up


def _fastest_first(up: list[int], health: Sequence[Health], rng: random.Random) -> list[int]:
    # Weighted by 1/rtt²: the fastest gets most queries, and the others still get a few, so
    # their latency stays measured. An upstream not yet measured is tried first.
    unmeasured = [index for index in up if health[index].rtt is None]
    if unmeasured:
        first = unmeasured[0]
    else:
        weights = [1.0 / max(health[index].rtt or 1e-4, 1e-4) ** 2 for index in up]
        first = rng.choices(up, weights=weights)[0]
    rest = sorted(
        (index for index in up if index != first),
        key=lambda index: health[index].rtt or 0.0,
    )
    return [first, *rest]
