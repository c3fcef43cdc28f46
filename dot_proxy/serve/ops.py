"""What the operations endpoint serves: the metrics of this process, or of every worker.

One process (no ``--workers``): a scrape reads this server's counters (:mod:`observe`) and
renders them. With ``--workers N`` there is still one endpoint on one port: the workers share
its listening socket (bound before they were forked), so whichever takes a connection answers
it, and each scrape must report them all. Each worker therefore publishes its snapshot to its
own slot of a shared memory region (:mod:`dot_proxy.core.slots`), once a second and just
before it answers a scrape; the one answering adds every slot up (counters and histograms
summed, each worker's process metrics under a ``worker`` label). Another worker's figures are
thus up to a second old, which a scrape every 15 s or more does not notice.

A worker restarted after a crash starts from what its predecessor left in the slot: it adds
its own counts to those (:func:`dot_proxy.core.metrics.carry`), so no summed counter goes back.
What the predecessor counted after its last publication (under a second) is lost with it.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from dot_proxy.core.metrics import Snapshot, carry, merge
from dot_proxy.core.slots import SlotTable
from dot_proxy.serve.exposition import render
from dot_proxy.serve.observe import ProcessReader, snapshot
from dot_proxy.serve.ops_http import OpsEndpoints
from dot_proxy.serve.running import Running

__all__ = ["PUBLISH_INTERVAL", "WorkerMetrics", "endpoints_for"]

log = logging.getLogger(__name__)

PUBLISH_INTERVAL: Final = 1.0
# A slot being written is read again this often, this many times, before its last good
# reading stands in (a writer descheduled mid-write on a busy machine).
_RETRY_EVERY: Final = 0.001
_RETRIES: Final = 50


class WorkerMetrics:
    """This worker's slot (number ``index`` in ``slots``) and the reading of everyone's."""

    def __init__(self, running: Running, slots: SlotTable, index: int) -> None:
        self._running = running
        self._slots = slots
        self._index = index
        self._process = ProcessReader()
        self._last_good: dict[int, Snapshot] = {}
        self._base = self._inherited()

    def _inherited(self) -> Snapshot:
        data = self._slots.read(self._index)
        if not data:
            if data is None:
                log.warning(
                    "worker %d: the slot of the worker before was half written; its "
                    "counts are lost",
                    self._index,
                )
            return Snapshot()
        try:
            return Snapshot.from_bytes(data)
        except ValueError as exc:
            log.warning(
                "worker %d: unreadable metrics slot (%s); starting from zero", self._index, exc
            )
            return Snapshot()

    def local(self) -> Snapshot:
        """This worker's metrics, its predecessors' counts included."""
        return carry(self._base, snapshot(self._running, self._process))

    def publish(self) -> None:
        try:
            self._slots.write(self._index, self.local().to_bytes())
        except ValueError as exc:
            log.warning("metrics not published: %s", exc)

    async def run_publisher(self) -> None:
        """Publish now and then every :data:`PUBLISH_INTERVAL` seconds, forever."""
        while True:
            self.publish()
            await trio.sleep(PUBLISH_INTERVAL)

    async def render(self) -> bytes:
        """Every worker's metrics added up, this one's fresh."""
        self.publish()
        parts = []
        for index in range(self._slots.count):
            part = await self._read(index)
            if part is not None:
                parts.append((index, part))
        return render(merge(parts), per_worker=True)

    async def _read(self, index: int) -> Snapshot | None:
        for _ in range(_RETRIES):
            data = self._slots.read(index)
            if data is not None:
                if not data:
                    return None  # never published: that worker has not started yet
                try:
                    self._last_good[index] = Snapshot.from_bytes(data)
                except ValueError:
                    break
                return self._last_good[index]
            await trio.sleep(_RETRY_EVERY)
        return self._last_good.get(index)


def endpoints_for(
    running: Running, stop: trio.Event, workers: WorkerMetrics | None = None
) -> OpsEndpoints:
    """The endpoint's view of ``running``: live while it serves and ``stop`` is not set,
    ready while also an upstream is usable; the metrics of ``workers``, or of this process."""
    process = ProcessReader()

    async def metrics() -> bytes:
        if workers is not None:
            return await workers.render()
        return render(snapshot(running, process))

    def live() -> bool:
        return running.listening is not None and not stop.is_set()

    def ready() -> bool:
        return live() and running.ready()

    return OpsEndpoints(metrics=metrics, live=live, ready=ready)
