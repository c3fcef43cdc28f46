"""The policy over one set of upstreams: which to ask, when to hedge, what counts as an answer.

The query's task asks upstreams one after another (failover); a background :class:`Hedger`
asks the next upstream too when the first is slower than its own recent p95, and the first
valid answer wins. Health (:mod:`dot_proxy.core.health`) orders the upstreams and a background
prober brings a down one back, so client queries are not spent finding out whether it
recovered. The group talks to each upstream's pool (:class:`~dot_proxy.upstream.pool.Upstream`)
only.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from dot_proxy.config import Config, PlainSpec, UpstreamSpec
from dot_proxy.core.health import TIMEOUTS_TO_DOWN, Health, Policy, order_upstreams
from dot_proxy.core.message import Rcode
from dot_proxy.errors import RaceLost, UpstreamError, fresh
from dot_proxy.upstream.health_log import HealthLog
from dot_proxy.upstream.hedger import Hedger
from dot_proxy.upstream.pool import Connect, open_upstreams
from dot_proxy.upstream.race import Race

__all__ = ["Member", "UpstreamGroup", "open_upstream_group", "run_upstream_group"]

log = logging.getLogger(__name__)

# An answer with these codes says the upstream could not resolve the name right now; another
# upstream may (dnsproxy #257). If every upstream says so, the last such answer is passed on.
SOFT_FAILURES = frozenset({Rcode.SERVFAIL, Rcode.REFUSED})
# How often the prober looks for a probe that is due: a probe starts at most this late.
PROBE_INTERVAL = 0.5
# ". IN NS" with RD set: any DNS answer to it, even REFUSED, shows the upstream is alive.
PROBE_QUERY = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + b"\x00\x00\x02\x00\x01"
PROBE_KEY = b"\x00\x00\x02\x00\x01"
_ONLY_ONE = (0,)  # the order of a group of one upstream, for every query
# Why an upstream is down, when it is not an error of its own.
_TIMEOUTS = f"no answer within the deadline {TIMEOUTS_TO_DOWN} times in a row"
_SLOWER = f"slower than the next upstream {TIMEOUTS_TO_DOWN} times in a row"


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
        "cancelled",
        "claimed",
        "error",
        "fallback",
        "finished",
        "hedge_scope",
        "key",
        "message",
        "order",
        "running",
    )

    def __init__(self, message: bytes, key: bytes, order: Sequence[int]) -> None:
        Race.__init__(self)  # not super(): this is made per query
        self.message = message
        self.key = key
        self.order = order
        self.claimed = 1  # the first upstream: the query's own task asks it
        self.running = 0
        self.fallback: bytes | None = None
        self.error: UpstreamError | None = None  # kept: through errors.fresh
        self.finished = False  # the query's task is done with it
        self.cancelled = False  # ... because it was cancelled (its deadline, a shutdown)
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
    :func:`run_upstream_group`); per-query state lives in the query's task. Without a nursery
    there is neither hedging nor probing. The upstreams' pools are the caller's.
    """

    def __init__(
        self,
        upstreams: Sequence[Member],
        config: Config,
        nursery: trio.Nursery | None = None,
        *,
        health: Sequence[Health] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("a resolver needs at least one upstream")
        self._upstreams = tuple(upstreams)
        # Given: the records a previous group kept (a reload keeps what it learnt).
        self.health = tuple(health) if health is not None else tuple(Health() for _ in upstreams)
        self._policy = Policy(config.upstream_policy)
        self._probe_deadline = config.timeout
        self._nursery = nursery
        self._rng = rng or random.Random()
        self._turn = 0
        # Hedging needs a nursery for its tasks and another upstream to hedge to.
        self._hedger: Hedger[_Attempts] | None = None
        if nursery is not None and len(upstreams) > 1:
            hedger = Hedger(
                self._start_hedge, hedge_after=config.hedge_after, ceiling=config.timeout / 2
            )
            self._hedger = hedger if hedger.enabled else None
        self._log = HealthLog(
            [upstream.spec.label for upstream in upstreams],
            down=[health.down for health in self.health],
        )
        self.hedges_started = 0  # read by the metrics

    @property
    def upstreams(self) -> Sequence[Member]:
        """The upstreams, in configured order."""
        return self._upstreams

    async def resolve(self, message: bytes, question_key: bytes) -> bytes:
        """The first valid answer to ``message`` from any upstream, with an arbitrary ID.

        Runs under the caller's deadline (its cancel scope); hedges end with the query.
        Error handling: when every upstream failed, the last SERVFAIL/REFUSED answer is
        returned if there was one, otherwise the last :class:`UpstreamError` is raised.
        """
        if len(self._upstreams) == 1:
            order: Sequence[int] = _ONLY_ONE  # nothing to order, and nothing to hedge to
        else:
            self._turn += 1
            order = order_upstreams(self.health, self._policy, turn=self._turn, rng=self._rng)
        race = _Attempts(message, question_key, order)
        try:
            # One clock read for the hedge's start and the first attempt's (every query).
            now = trio.current_time()
            if self._hedger is not None:
                self._hedger.watch(race, self.health[order[0]], now)
            index: int | None = order[0]
            while index is not None:
                answer = await self._attempt(index, race, now)
                if answer is not None:
                    return answer
                index = race.claim()
                now = trio.current_time()  # the next upstream's attempt starts now
            while race.answer is None and race.running:
                await race.wait()  # a hedge is still asking the last upstreams
        except trio.Cancelled:
            race.cancelled = True
            raise
        finally:
            race.finished = True
            if race.hedge_scope is not None:
                race.hedge_scope.cancel()
        if race.answer is not None:
            return race.answer
        if race.fallback is not None:
            return race.fallback
        # A copy: the race, held by this frame, keeps the error (see errors.fresh).
        raise fresh(race.error) if race.error else UpstreamError("no upstream answered")

    async def _attempt(self, index: int, race: _Attempts, started: float) -> bytes | None:
        """Ask one upstream, starting at ``started``; the race's winner, else None.

        The one place where an attempt's outcome is counted in the upstream's health, for the
        query's own attempts and its hedges alike.
        """
        race.running += 1
        try:
            answer = await self._upstreams[index].query(race.message, race.key, race)
        except RaceLost:
            if index == race.order[0]:
                # The hedged-against upstream was slower than its budget and than another.
                lost_at = trio.current_time()
                self._update_health(index, lambda health: health.record_lost_race(lost_at), _SLOWER)
            return race.answer
        except UpstreamError as exc:
            log.debug("%s", exc)
            at = trio.current_time()
            self._update_health(
                index, lambda health: health.record_failure(at), self._why(index, exc)
            )
            race.error = fresh(exc)  # not exc: its frames hold the race (see errors.fresh)
            return None
        except trio.Cancelled:
            # The query's deadline (or a shutdown), for its own attempt and for a hedge that
            # was still asking then; not a hedge that lost to an answer.
            if not race.finished or race.cancelled:
                at = trio.current_time()
                self._update_health(
                    index, lambda health: health.record_failure(at, timeout=True), _TIMEOUTS
                )
            raise
        finally:
            race.running -= 1
            race.wake()
        if answer[3] & 0x0F in SOFT_FAILURES:
            # SERVFAIL or REFUSED: alive, but another upstream may do better (dnsproxy #257).
            self.health[index].record_soft_failure()
            race.fallback = answer
            return None
        self._answered(index, started)
        if race.answer is None:
            race.answer = answer
        return race.answer

    def _answered(self, index: int, started: float) -> None:
        # Every answer, of a client query or of a probe, that shows the upstream is up.
        health = self.health[index]
        finished = trio.current_time()
        was_down = health.down
        health.record_answer(finished, finished - started)
        if was_down:
            self._log.came_back(index, finished)

    def _update_health(self, index: int, change: Callable[[Health], None], why: str) -> None:
        # Every failure, of a client query or of a probe.
        health = self.health[index]
        was_down = health.down
        change(health)
        if health.down and not was_down:
            self._log.went_down(index, trio.current_time(), why, probe_in=health.backoff)

    def _why(self, index: int, error: UpstreamError) -> str:
        # The error's message without the upstream's label: the log line starts with it.
        return str(error).removeprefix(f"{self._upstreams[index].spec.label}: ")

    # --- hedging ---------------------------------------------------------------------------

    def _start_hedge(self, race: _Attempts) -> None:
        # Called by the hedger when the race's budget has run out.
        if not race.finished and race.answer is None and self._may_hedge(race):
            assert self._nursery is not None  # no hedger without one
            race.hedge_scope = trio.CancelScope()  # cancelled when the query is done
            self.hedges_started += 1
            self._nursery.start_soon(self._hedge, race, race.hedge_scope)

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

    async def run(self) -> None:
        """The group's background work, until cancelled: the hedger and the prober."""
        async with trio.open_nursery() as nursery:
            if self._hedger is not None:
                nursery.start_soon(self._hedger.run)
            nursery.start_soon(self._run_prober)

    async def _run_prober(self) -> None:
        """Probe down upstreams in the background until they answer again."""
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            all_down = all(health.down for health in self.health)
            for index, health in enumerate(self.health):
                if health.probe_due(now, all_down=all_down):
                    health.probing = True
                    self._nursery.start_soon(self._probe, index)
                probe_in = max(0.0, health.next_probe - now)
                self._log.tick(index, now, down=health.down, probe_in=probe_in)
            await trio.sleep(PROBE_INTERVAL)

    async def _probe(self, index: int) -> None:
        # Any DNS answer, even SERVFAIL or REFUSED, shows the upstream is up again.
        started = trio.current_time()
        why = f"no answer to a probe within {self._probe_deadline:g} s"
        try:
            with trio.move_on_after(self._probe_deadline):
                await self._upstreams[index].query(PROBE_QUERY, PROBE_KEY)
                self._answered(index, started)
                return
        except UpstreamError as exc:
            why = self._why(index, exc)
        finally:
            self.health[index].probing = False
        at = trio.current_time()
        self._update_health(index, lambda health: health.record_probe_failure(at), why)
        log.debug(
            "probe of %s failed (%s); next in %g s",
            self._upstreams[index].spec.label,
            why,
            self.health[index].backoff,
        )


@asynccontextmanager
async def run_upstream_group(
    upstreams: Sequence[Member],
    config: Config,
    *,
    health: Sequence[Health] | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[UpstreamGroup]:
    """A group over ``upstreams`` (opened by the caller) with its background tasks running;
    ``health``, if given, is one record per upstream to go on from. ``rng`` draws the
    ``fastest`` policy's choices (seeded, a run can be replayed).

    Resource handling: the hedger, the prober and any hedge are cancelled on exit.
    """
    async with trio.open_nursery() as nursery:
        group = UpstreamGroup(upstreams, config, nursery, health=health, rng=rng)
        nursery.start_soon(group.run)
        try:
            yield group
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_upstream_group(
    config: Config,
    *,
    specs: Sequence[UpstreamSpec | PlainSpec] | None = None,
    connect: Connect | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[UpstreamGroup]:
    """Open the upstream pools (``config.upstreams``, or ``specs``: a ``--forward`` zone's;
    see :func:`~dot_proxy.upstream.pool.open_upstreams` for ``connect``) and a group over
    them (:func:`run_upstream_group`)."""
    async with (
        open_upstreams(config, specs=specs, connect=connect) as upstreams,
        run_upstream_group(upstreams, config, rng=rng) as group,
    ):
        yield group
