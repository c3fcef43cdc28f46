"""What the log says about upstreams going down and coming back: :class:`HealthLog`.

An operator reads the log to learn which upstreams work. It should say an upstream went down
once, with why, and that it answers again once, whoever found out (the background probe or a
client query), so that its last word on each upstream is true. Nothing per client query: an
upstream that is down fails every query that tries it, and a line each would bury the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["REPEAT_AFTER", "HealthLog"]

log = logging.getLogger(__name__)

# A flapping upstream (down, up, down ...) is reported at most once in this many seconds; what
# happened in between is summed up when the time is over.
REPEAT_AFTER: Final = 60.0


@dataclass(slots=True)
class _Said:
    down: bool = False  # the log's last word on it is "down"
    quiet_until: float = float("-inf")  # no new "down" before this
    unsaid_downs: int = 0  # went down meanwhile without a line
    reason: str = ""  # of the last one


class HealthLog:
    """Logs each upstream's transitions between up and down, once each, rate-limited.

    The group calls :meth:`went_down` and :meth:`came_back` on every transition, and
    :meth:`tick` now and then (the prober does, twice a second): a "down" held back by the
    rate limit is said then, if the upstream is still down, or summed up if it came back.
    """

    __slots__ = ("_labels", "_said")

    def __init__(self, labels: Sequence[str], *, down: Sequence[bool] = ()) -> None:
        self._labels = tuple(labels)
        # ``down``: the upstreams already said to be down (by the log of the group this one
        # replaces, after a reload), so that their coming back is said.
        self._said = [_Said(down=was) for was in down or [False] * len(labels)]

    def went_down(self, index: int, now: float, reason: str, *, probe_in: float) -> None:
        """Upstream ``index`` is down since ``now`` because of ``reason``."""
        said = self._said[index]
        said.reason = reason
        if now < said.quiet_until:
            said.unsaid_downs += 1
            return
        self._say_down(index, now, probe_in)

    def came_back(self, index: int, now: float) -> None:
        """Upstream ``index``, down, answered at ``now``."""
        said = self._said[index]
        if said.down:
            said.down = False
            label = self._labels[index]
            log.warning("%s answers again", label, extra={"upstream": label})

    def tick(self, index: int, now: float, *, down: bool, probe_in: float) -> None:
        """Say what the rate limit held back about ``index``, once it allows."""
        said = self._said[index]
        if not said.unsaid_downs or now < said.quiet_until:
            return
        if down and not said.down:
            self._say_down(index, now, probe_in)
        elif not down:
            log.warning(
                "%s went down and came back %d more times in the last %g s (last: %s)",
                self._labels[index],
                said.unsaid_downs,
                REPEAT_AFTER,
                said.reason,
                extra={"upstream": self._labels[index]},
            )
            said.unsaid_downs = 0
            said.quiet_until = now + REPEAT_AFTER

    def _say_down(self, index: int, now: float, probe_in: float) -> None:
        said = self._said[index]
        times = said.unsaid_downs
        more = f"; went down {times} times in the last {REPEAT_AFTER:g} s" if times else ""
        log.warning(
            "%s is down (%s%s); probing it in %g s, then less and less often",
            self._labels[index],
            said.reason,
            more,
            probe_in,
            extra={"upstream": self._labels[index]},  # a field of its own in JSON logs
        )
        said.down = True
        said.unsaid_downs = 0
        said.quiet_until = now + REPEAT_AFTER
