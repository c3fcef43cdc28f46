"""Several worker processes on one port (``--workers``): fork them, restart them, stop them.

One Python process tops out at one core. With ``--workers N`` the sockets are bound N times
with SO_REUSEPORT (see ``serve.sockets.bind_worker_sockets``) and each set is served by a
forked process running the whole proxy: its own trio loop, upstream pool, health and hedging.
The parent only supervises: it forwards SIGTERM/SIGINT to the workers and waits for them
(calling its ``on_stop`` once, as the stop begins: the service manager hears STOPPING=1 from
the process it started), and on SIGHUP calls its ``reload`` (to fork later workers with the
new settings) and passes the signal on, so that every worker reloads.
Workers share nothing, so there is nothing to lock, and one that dies takes no other down.

A worker that exits while the proxy is not stopping has crashed: the parent logs it and forks
a new one on the same sockets after a backoff (0.1 s, doubling with each recent crash). The
parent keeps every worker's sockets open for this, so what clients send meanwhile waits in the
kernel's queues for the new worker instead of being refused, and the port needs no second
bind (which, after --user dropped root, a port below 1024 would not allow). Crashes that come
back (``CrashPolicy``: 5 within 30 s) are a fault a restart does not cure: the parent then
stops every worker and exits 1, for systemd or the container runtime to see. A worker whose
parent is gone (killed with SIGKILL) stops by itself: it watches its parent (``watch_parent``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

import trio

__all__ = ["CrashPolicy", "run_workers", "watch_parent"]

log = logging.getLogger(__name__)

# How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 1.0
# How often the parent looks for a worker's exit while a restart is due.
_POLL_INTERVAL = 0.05
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# Blocked while forking: a handler must not run in a child that inherited it.
_HANDLED_SIGNALS = {*_STOP_SIGNALS, signal.SIGHUP}

#: ``serve_one(sockets, parent_pid, worker_number)``; the number is the same for a restart.
ServeOne = Callable[[list[socket.socket], int, int], None]


@dataclass(frozen=True, slots=True)
class CrashPolicy:
    """When to restart a crashed worker, and when to give up. Pure: times are passed in.

    ``limit`` crashes (of any worker) within ``window`` seconds stop the proxy; below that,
    the n-th recent crash is restarted after ``first_delay * 2**(n-1)``, at most ``max_delay``.
    """

    limit: int = 5
    window: float = 30.0
    first_delay: float = 0.1
    max_delay: float = 5.0

    def restart_delay(self, crashes: list[float], now: float) -> float | None:
        """Record a crash at ``now`` in ``crashes`` (pruned in place); the delay before the
        restart, or ``None`` when crashes came back too often to restart again."""
        crashes[:] = [when for when in crashes if now - when < self.window]
        crashes.append(now)
        if len(crashes) >= self.limit:
            return None
        return min(self.first_delay * 2.0 ** (len(crashes) - 1), self.max_delay)


def run_workers(
    socket_sets: Sequence[list[socket.socket]],
    serve_one: ServeOne,
    *,
    policy: CrashPolicy | None = None,
    reload: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> int:
    """Fork one worker per socket set, each running ``serve_one(sockets, parent_pid, n)``.

    ``reload`` runs on SIGHUP before the workers get it; ``on_stop`` once, when the workers
    are first told to stop (a stop signal, or crashes that came back too often). Both run in
    a signal handler: they must be quick and must not block.
    Returns the exit status for the parent: 0 when every worker stopped because the proxy was
    asked to stop, 1 when crashes came back too often (or a worker failed to stop cleanly).
    Resource handling: the parent keeps the sockets, to restart workers on them, and closes
    them on return; every worker is waited for.
    """
    supervisor = _Supervisor(socket_sets, serve_one, policy or CrashPolicy(), reload, on_stop)
    previous = {sig: signal.signal(sig, supervisor.stop_all) for sig in _STOP_SIGNALS}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, supervisor.reload)
    try:
        return supervisor.run()
    except BaseException:
        supervisor.stop_all()
        for pid in list(supervisor.workers):
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sockets in socket_sets:
            for sock in sockets:
                sock.close()


class _Supervisor:
    def __init__(
        self,
        socket_sets: Sequence[list[socket.socket]],
        serve_one: ServeOne,
        policy: CrashPolicy,
        on_reload: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.socket_sets = socket_sets
        self.serve_one = serve_one
        self.policy = policy
        self.on_reload = on_reload
        self.on_stop = on_stop
        self.parent = os.getpid()
        self.workers: dict[int, int] = {}  # pid → worker number
        self.due: dict[int, float] = {}  # worker number → when to start it again
        self.crashes: list[float] = []
        self.stopping = False
        self.status = 0

    def stop_all(self, _signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        if not self.stopping and self.on_stop is not None:
            self.on_stop()
        self.stopping = True
        self.due.clear()
        for pid in self.workers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reload(self, _signum: int = signal.SIGHUP, _frame: FrameType | None = None) -> None:
        if self.stopping:
            return
        if self.on_reload is not None:
            try:
                self.on_reload()
            except Exception:
                log.exception("reload in the supervising process failed")
        for pid in self.workers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def run(self) -> int:
        for number in range(len(self.socket_sets)):
            self._start(number)
        log.info("started %d workers: %s", len(self.workers), ", ".join(map(str, self.workers)))
        while self.workers or self.due:
            if self.due:
                number, when = min(self.due.items(), key=lambda item: item[1])
                if time.monotonic() >= when:
                    del self.due[number]
                    log.info("worker %d restarted (pid %d)", number, self._start(number))
                    continue
                pid, wait_status = _wait_for_child(until=when)
            else:
                pid, wait_status = os.waitpid(-1, 0)
            if pid in self.workers:
                self._ended(pid, os.waitstatus_to_exitcode(wait_status))
        return self.status

    def _start(self, number: int) -> int:
        # A stop that arrives while forking waits until the worker exists (so that it reaches
        # it), and never runs stop_all in a child that inherited it.
        with _stop_signals_blocked():
            pid = os.fork()
            if pid == 0:
                _be_worker(
                    number, self.socket_sets[number], self.socket_sets, self.serve_one, self.parent
                )
            self.workers[pid] = number
        return pid

    def _ended(self, pid: int, code: int) -> None:
        number = self.workers.pop(pid)
        if self.stopping:
            if code not in (0, -signal.SIGTERM):
                # Killed by our SIGTERM before it could take it gracefully is a stop too.
                self.status = 1
            return
        delay = self.policy.restart_delay(self.crashes, time.monotonic())
        if delay is None:
            log.error(
                "worker %d (pid %d) %s: %d crashes within %g s; stopping the others",
                *(number, pid, _how(code), self.policy.limit, self.policy.window),
            )
            self.status = 1
            self.stop_all()
            return
        log.error("worker %d (pid %d) %s; restarting it in %g s", number, pid, _how(code), delay)
        self.due[number] = time.monotonic() + delay


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)


def _wait_for_child(*, until: float) -> tuple[int, int]:
    """``os.waitpid(-1)`` that gives up at ``until`` (monotonic): ``(0, 0)`` then."""
    while True:
        with suppress(ChildProcessError):  # every worker is down, waiting to restart
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid:
                return pid, wait_status
        remaining = until - time.monotonic()
        if remaining <= 0:
            return 0, 0
        time.sleep(min(_POLL_INTERVAL, remaining))


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
        # A reload before the worker listens for it must not kill it (SIGHUP's default):
        # the worker was forked with the parent's latest configuration anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
        for sockets in socket_sets:
            if sockets is not mine:
                for sock in sockets:
                    sock.close()
        log.info("worker %d (pid %d) serving", number, os.getpid())
        serve_one(mine, parent, number)
        log.info("worker %d (pid %d) stopped", number, os.getpid())
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
