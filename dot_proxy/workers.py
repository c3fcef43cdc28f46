"""Several worker processes on one port (``--workers``): fork them, stop them together.

One Python process tops out at one core. With ``--workers N`` the sockets are bound N times
with SO_REUSEPORT (see ``server.bind_worker_sockets``) and each set is served by a forked
process running the whole proxy: its own trio loop, upstream pool, health and hedging. The
parent only supervises: it forwards SIGTERM/SIGINT to the workers and waits for them. Workers
share nothing, so there is nothing to lock, and one that dies takes no other down with it.

A worker that exits while the proxy is not stopping is a fault: the parent stops the others
and exits 1, so that whatever supervises the proxy (systemd, a container runtime) restarts
it whole rather than leaving it silently short of workers. A worker whose parent is gone (the
parent was killed with SIGKILL) stops by itself: it watches its parent (``watch_parent``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from contextlib import suppress
from types import FrameType
from typing import NoReturn

import trio

__all__ = ["run_workers", "watch_parent"]

log = logging.getLogger(__name__)

# How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 1.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

ServeOne = Callable[[list[socket.socket], int], None]


def run_workers(socket_sets: Sequence[list[socket.socket]], serve_one: ServeOne) -> int:
    """Fork one worker per socket set, each running ``serve_one(sockets, parent_pid)``.

    Returns the exit status for the parent: 0 when every worker stopped because the proxy was
    asked to stop, 1 when one stopped or failed on its own. Resource handling: the parent
    closes its copies of the sockets once the workers have theirs; every worker is waited for.
    """
    parent = os.getpid()
    workers: dict[int, int] = {}  # pid → worker number
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in _STOP_SIGNALS}
    try:
        # A stop that arrives while forking waits until every worker exists (so that it
        # reaches them all), and never runs stop_all in a child that inherited it.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for number, sockets in enumerate(socket_sets):
                pid = os.fork()
                if pid == 0:
                    _be_worker(number, sockets, socket_sets, serve_one, parent)
                workers[pid] = number
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            for sockets in socket_sets:
                for sock in sockets:
                    sock.close()
        log.info("started %d workers: %s", len(workers), ", ".join(map(str, workers)))
        status = 0
        while workers:
            pid, wait_status = os.waitpid(-1, 0)
            if pid not in workers:
                continue
            number = workers.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if not stopping:
                log.error("worker %d (pid %d) ended (%d); stopping the others", number, pid, code)
                status = 1
                stop_all()
            elif code not in (0, -signal.SIGTERM):
                # Killed by our SIGTERM before it could take it gracefully is a stop too.
                status = 1
    except BaseException:
        stop_all()
        for pid in list(workers):
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _be_worker(
    number: int,
    mine: list[socket.socket],
    socket_sets: Sequence[list[socket.socket]],
    serve_one: ServeOne,
    parent: int,
) -> NoReturn:
    # A forked child must never return into the parent's code (its finally blocks, atexit):
    # it leaves through os._exit whatever happens.
    status = 1
    try:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # trio installs its own while serving
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        for sockets in socket_sets:
            if sockets is not mine:
                for sock in sockets:
                    sock.close()
        log.info("worker %d (pid %d) serving", number, os.getpid())
        serve_one(mine, parent)
        status = 0
    except BaseException:
        log.exception("worker %d failed", number)
    finally:
        logging.shutdown()
        os._exit(status)


async def watch_parent(parent: int, stop: trio.Event) -> None:
    """Set ``stop`` once ``parent`` is no longer this process's parent (it died)."""
    while True:
        await trio.sleep(PARENT_CHECK_INTERVAL)
        if os.getppid() != parent:
            break
    log.warning("the supervising process %d is gone; stopping", parent)
    stop.set()
