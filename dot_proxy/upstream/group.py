"""Per-query policy, no sockets: which upstreams to ask, when to hedge, what counts as an answer.

The query's task asks upstreams one after another (failover); a background hedger asks the
next upstream too when the first is slower than its own recent p95, and the first valid answer
wins. Health (:mod:`dot_proxy.core.health`) orders the upstreams and a background prober brings a
down one back, so client queries are not spent finding out whether it recovered.
"""

from __future__ import annotations

import heapq
import logging
import random
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from dot_proxy.config import Config, PlainSpec, UpstreamSpec
from dot_proxy.core.health import Health, Policy, order_upstreams
from dot_proxy.core.message import Rcode
from dot_proxy.errors import RaceLost, UpstreamError, fresh
from dot_proxy.upstream.pool import open_upstreams
from dot_proxy.upstream.race import Race

__all__ = ["Member", "UpstreamGroup", "open_upstream_group"]

log = logging.getLogger(__name__)

# An answer with these codes says the upstream could not resolve the name right now; another
# upstream may (dnsproxy #257). If every upstream says so, the last such answer is passed on.
SOFT_FAILURES = frozenset({Rcode.SERVFAIL, Rcode.REFUSED})
HEDGE_FLOOR = 0.1
PROBE_INTERVAL = 0.5
_HEDGER_TICK = 0.02
# Under load a hedge falls due every few hundred µs; waking for each cost ~10 µs of CPU per
# query (a cancel scope and a deadline per sleep). Hedges due within this of the first one due
# start together instead: at most this late, against a budget of at least HEDGE_FLOOR.
HEDGER_RESOLUTION = 0.005
# ". IN NS" with RD set: any DNS answer to it, even REFUSED, shows the upstream is alive.
PROBE_QUERY = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + b"\x00\x00\x02\x00\x01"
PROBE_KEY = b"\x00\x00\x02\x00\x01"


class _Named(Protocol):
    @property
    def label(self) -> str: ...


class Member(Protocol):
    """What the group needs of an upstream: a name for its logs and a way to ask it. A DoT
    pool (:class:`~dot_proxy.upstream.pool.Upstream`) and a ``plain:`` resolver
    (:class:`~dot_proxy.upstream.plain.PlainUpstream`) are both one."""

    @property
    def spec(self) -> _Named: ...

    @property
    def connections(self) -> Sequence[object]:
        """The connections open or opening now (for the metrics)."""
        ...

    async def query(self, message: bytes, key: bytes, race: Race | None = None) -> bytes:
        """The answer (any ID); raises UpstreamError, RaceLost once ``race`` is won."""
        ...


class _Attempts(Race):
    """One query's race across upstreams, shared by its task and any hedge task."""

    __slots__ = (
        "claimed",
        "deadline",
        "error",
        "fallback",
        "finished",
        "hedge_scope",
        "key",
        "message",
        "order",
        "running",
    )

    def __init__(self, message: bytes, key: bytes, order: list[int], deadline: float) -> None:
        super().__init__()
        self.message = message
        self.key = key
        self.order = order
        self.deadline = deadline  # the query task's, which a hedge task must keep too
        self.claimed = 0
        self.running = 0
        self.fallback: bytes | None = None
        self.error: UpstreamError | None = None
        self.finished = False
        self.hedge_scope: trio.CancelScope | None = None

    def claim(self) -> int | None:
        """The next upstream nobody has asked yet, or None."""
        if self.claimed >= len(self.order):
            return None
        self.claimed += 1
        return self.order[self.claimed - 1]


class UpstreamGroup:
    """Answers queries from the upstreams, keeping their health.

    Resource handling: the hedger and prober tasks run in ``nursery`` (see
    :func:`open_upstream_group`); per-query state lives in the query's task.
    """

    def __init__(
        self,
        upstreams: Sequence[Member],
        config: Config,
        nursery: trio.Nursery | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("a resolver needs at least one upstream")
        self._upstreams = tuple(upstreams)
        self.health = tuple(Health() for _ in upstreams)
        self._policy = Policy(config.upstream_policy)
        self._hedge_after = config.hedge_after
        self._ceiling = config.timeout / 2
        self._probe_deadline = config.timeout
        self._nursery = nursery
        self._rng = rng or random.Random()
        self._turn = 0
        self._hedges: list[tuple[float, int, _Attempts]] = []
        self._hedge_lot = trio.lowlevel.ParkingLot()
        self._hedge_count = 0
        self.hedges_started = 0  # read by the metrics
        self._quiet_until: dict[int, float] = {}

    @property
    def upstreams(self) -> Sequence[Member]:
        """The upstreams, in configured order."""
        return self._upstreams

    async def resolve(
        self, message: bytes, question_key: bytes, deadline: float | None = None
    ) -> bytes:
        """The first valid answer to ``message`` from any upstream, with an arbitrary ID.

        Runs under the caller's deadline, which a hedge task keeps too: pass it as ``deadline``
        when it is at hand (finding it costs a walk up the cancel scopes). Error handling: when
        every upstream failed, the last SERVFAIL/REFUSED answer is returned if there was one,
        otherwise the last :class:`UpstreamError` is raised.
        """
        if len(self._upstreams) == 1:
            return await self._resolve_alone(message, question_key)
        self._turn += 1
        race = _Attempts(
            message,
            question_key,
            order_upstreams(self.health, self._policy, turn=self._turn, rng=self._rng),
            trio.current_effective_deadline() if deadline is None else deadline,
        )
        try:
            # One clock read for the hedge's start and the first attempt's (every query).
            now = trio.current_time()
            self._watch_for_hedging(race, now)
            while (index := race.claim()) is not None:
                answer = await self._attempt(index, race, now)
                if answer is not None:
                    return answer
                now = trio.current_time()  # the next upstream's attempt starts now
            while race.answer is None and race.running:
                await race.wait()  # a hedge is still asking the last upstreams
        finally:
            race.finished = True
            if race.hedge_scope is not None:
                race.hedge_scope.cancel()
        if race.answer is not None:
            return race.answer
        if race.fallback is not None:
            return race.fallback
        raise race.error or UpstreamError("no upstream answered")

    async def _resolve_alone(self, message: bytes, question_key: bytes) -> bytes:
        # One upstream: nothing to order, race or hedge, so none of that per-query work. The
        # upstream's health is still kept, for its logs and for the background probe.
        started = trio.current_time()
        try:
            answer = await self._upstreams[0].query(message, question_key)
        except UpstreamError:
            self._failed(0, trio.current_time(), timeout=False)
            raise
        except trio.Cancelled:
            self._failed(0, trio.current_time(), timeout=True)
            raise
        self._record_answer(0, answer, started)
        return answer

    async def _attempt(self, index: int, race: _Attempts, started: float) -> bytes | None:
        """Ask one upstream, starting at ``started``; the race's winner, else None."""
        race.running += 1
        try:
            answer = await self._upstreams[index].query(race.message, race.key, race)
        except RaceLost:
            if index == race.order[0]:
                # The hedged-against upstream was slower than its budget and than another.
                lost_at = trio.current_time()
                self._update_health(index, lambda health: health.record_lost_race(lost_at))
            return race.answer
        except UpstreamError as exc:
            log.debug("%s", exc)
            self._failed(index, trio.current_time(), timeout=False)
            race.error = fresh(exc)  # not exc: its frames hold the race (see errors.fresh)
            return None
        except trio.Cancelled:
            if not race.finished:  # the query's deadline, not a hedge that lost
                self._failed(index, trio.current_time(), timeout=True)
            raise
        finally:
            race.running -= 1
            race.wake()
        if not self._record_answer(index, answer, started):
            race.fallback = answer
            return None
        if race.answer is None:
            race.answer = answer
        return race.answer

    def _record_answer(self, index: int, answer: bytes, started: float) -> bool:
        """Count an upstream's answer in its health; False for a soft failure."""
        if answer[3] & 0x0F in SOFT_FAILURES:
            self.health[index].record_soft_failure()
            return False
        finished = trio.current_time()
        self.health[index].record_answer(finished, finished - started)
        return True

    def _failed(self, index: int, at: float, *, timeout: bool) -> None:
        self._update_health(index, lambda health: health.record_failure(at, timeout=timeout))

    def _update_health(self, index: int, change: Callable[[Health], None]) -> None:
        was_down = self.health[index].down
        change(self.health[index])
        if self.health[index].down and not was_down:
            self._log_down(index)

    def _log_down(self, index: int) -> None:
        # An upstream that flaps (late answers from before it froze mark it up again) would
        # fill the log: say it once a minute at most.
        now = trio.current_time()
        if now < self._quiet_until.get(index, float("-inf")):
            return
        self._quiet_until[index] = now + 60.0
        label = self._upstreams[index].spec.label
        backoff = self.health[index].backoff
        log.warning(
            "%s is down; probing it again in %g s", label, backoff, extra={"upstream": label}
        )

    # --- hedging ---------------------------------------------------------------------------

    def _watch_for_hedging(self, race: _Attempts, now: float) -> None:
        if self._nursery is None or self._hedge_after == 0 or len(race.order) < 2:
            return
        first = self.health[race.order[0]]
        budget = (
            self._hedge_after
            if self._hedge_after is not None
            else first.hedge_budget(floor=HEDGE_FLOOR, ceiling=self._ceiling)
        )
        self._hedge_count += 1
        heapq.heappush(self._hedges, (now + budget, self._hedge_count, race))
        if len(self._hedges) == 1:
            self._hedge_lot.unpark()

    async def run_hedger(self) -> None:
        """Start a hedge for every query still unanswered when its budget runs out."""
        assert self._nursery is not None
        hedges = self._hedges
        while True:
            if not hedges:
                await self._hedge_lot.park()
                continue
            now = trio.current_time()
            while hedges and hedges[0][0] <= now:
                race = heapq.heappop(hedges)[2]
                if not race.finished and race.answer is None and self._may_hedge(race):
                    race.hedge_scope = trio.CancelScope(deadline=race.deadline)
                    self.hedges_started += 1
                    self._nursery.start_soon(self._hedge, race, race.hedge_scope)
            if hedges:
                wake_at = max(hedges[0][0], now + HEDGER_RESOLUTION)
                await trio.sleep_until(min(wake_at, now + _HEDGER_TICK))

    def _may_hedge(self, race: _Attempts) -> bool:
        # A hedge goes to the next *healthy* upstream: a down one is left to the prober and
        # its backoff (RFC 7858 §3.1), not hammered by every slow query. The query's own task
        # still tries it as a last resort.
        return race.claimed < len(race.order) and not self.health[race.order[race.claimed]].down

    async def _hedge(self, race: _Attempts, scope: trio.CancelScope) -> None:
        with scope:
            while not race.finished and race.answer is None and self._may_hedge(race):
                index = race.claim()
                if index is None:
                    return
                log.debug("hedging to %s", self._upstreams[index].spec.label)
                if await self._attempt(index, race, trio.current_time()) is not None:
                    race.wake()
                    return

    # --- probing ---------------------------------------------------------------------------

    async def run_prober(self) -> None:
        """Probe down upstreams in the background until they answer again."""
        assert self._nursery is not None
        probing: set[int] = set()
        while True:
            now = trio.current_time()
            for index, health in enumerate(self.health):
                if health.probe_due(now) and index not in probing:
                    probing.add(index)
                    self._nursery.start_soon(self._probe, index, probing)
            await trio.sleep(PROBE_INTERVAL)

    async def _probe(self, index: int, probing: set[int]) -> None:
        upstream, health = self._upstreams[index], self.health[index]
        started = trio.current_time()
        try:
            with trio.move_on_after(self._probe_deadline):
                await upstream.query(PROBE_QUERY, PROBE_KEY)
                now = trio.current_time()
                health.record_answer(now, now - started)
                label = upstream.spec.label
                log.warning("%s answers again", label, extra={"upstream": label})
                return
            health.record_failure(trio.current_time())
        except UpstreamError as exc:
            log.debug("probe: %s", exc)
            health.record_failure(trio.current_time())
        finally:
            probing.discard(index)


@asynccontextmanager
async def open_upstream_group(
    config: Config, *, specs: Sequence[UpstreamSpec | PlainSpec] | None = None
) -> AsyncIterator[UpstreamGroup]:
    """Open the upstream pools (``config.upstreams``, or ``specs``: a ``--forward`` zone's)
    and a group over them, with its background tasks."""
    async with open_upstreams(config, specs=specs) as upstreams, trio.open_nursery() as nursery:
        resolver = UpstreamGroup(upstreams, config, nursery)
        nursery.start_soon(resolver.run_hedger)
        nursery.start_soon(resolver.run_prober)
        try:
            yield resolver
        finally:
            nursery.cancel_scope.cancel()
