"""Run the proxy once its sockets are bound: one process, or supervised workers.

Each serving process runs one trio loop holding the server (``serve``), the operations
endpoint (``--metrics``), and the signal handlers: SIGINT/SIGTERM stop it gracefully, SIGHUP
reloads the config file. With ``--workers`` the parent supervises (``workers.py``): it keeps
the sockets, the metrics socket and the metrics' shared memory for workers it restarts, and
on SIGHUP re-reads the file itself (so that a worker restarted later starts with the new
settings) and passes the signal on, so every worker reloads.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from dot_proxy.config import Config, host_port
from dot_proxy.core.slots import SlotTable
from dot_proxy.errors import ConfigError
from dot_proxy.logs import configure_logging
from dot_proxy.reloading import plan_reload, reload_on_sighup
from dot_proxy.serve.notify import Notifier
from dot_proxy.serve.ops import WorkerMetrics, endpoints_for
from dot_proxy.serve.ops_http import serve_ops
from dot_proxy.serve.running import Running, open_running
from dot_proxy.serve.server import serve
from dot_proxy.workers import run_workers, watch_parent

__all__ = ["Launch", "run"]

log = logging.getLogger("dot_proxy")

Rebuild = Callable[[Config], Config]


@dataclass(slots=True)
class Launch:
    """What a serving process starts from. ``config`` is the one in force: the parent of
    workers replaces it on a reload, for the workers it forks afterwards."""

    config: Config
    rebuild: Rebuild
    ops_socket: socket.socket | None = None
    slots: SlotTable | None = None


def run(launch: Launch, socket_sets: list[list[socket.socket]]) -> int:
    """Serve until stopped; the exit status (0, or 1 when workers kept crashing).

    Resource handling: the sockets and the metrics socket are closed on return.
    """
    # Until trio takes SIGHUP over, a reload signal must not kill the process (its default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if len(socket_sets) == 1:
            trio.run(serve_process, launch, socket_sets[0])
            return 0
        if launch.ops_socket is not None:
            # Shared between the workers forked below, and any forked later in their place.
            region = mmap.mmap(-1, SlotTable.bytes_needed(len(socket_sets)))
            launch.slots = SlotTable(memoryview(region), len(socket_sets))
        # The sockets are bound and listening: what arrives before the workers run waits in
        # the kernel's queues. The workers themselves do not notify (NotifyAccess=main): the
        # supervisor says READY=1 now and STOPPING=1 when it tells them to stop.
        notifier = Notifier.from_environ(os.environ)
        notifier.ready(f"{len(socket_sets)} workers serving")
        return run_workers(
            socket_sets,
            _serve_worker(launch),
            reload=_parent_reload(launch),
            on_stop=notifier.stopping,
        )
    finally:
        if launch.ops_socket is not None:
            launch.ops_socket.close()


async def serve_process(
    launch: Launch, sockets: list[socket.socket], parent: int | None = None, number: int = 0
) -> None:
    """One serving process: the server, its endpoint, its signals, until a stop signal."""
    stop = trio.Event()
    config = launch.config
    # The service manager hears from the process it started, not from workers (parent set).
    notifier = Notifier.from_environ(os.environ) if parent is None else None
    async with open_running(config) as running, trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        nursery.start_soon(reload_on_sighup, running, launch.rebuild)
        if parent is not None:
            nursery.start_soon(watch_parent, parent, stop)
        if launch.ops_socket is not None:
            workers = None
            if launch.slots is not None:
                workers = WorkerMetrics(running, launch.slots, number)
                nursery.start_soon(workers.run_publisher)
            endpoints = endpoints_for(running, stop, workers)
            await nursery.start(serve_ops, launch.ops_socket, endpoints)
        bound = await nursery.start(
            _serve_then_end, config, sockets, stop, running, nursery.cancel_scope
        )
        if notifier is not None and notifier.enabled:
            # Type=notify: systemd counts the service started only now, once it answers.
            where = (f"{kind} {host_port(address, port)}" for kind, address, port in bound)
            notifier.ready("serving on " + ", ".join(where))
            await stop.wait()
            notifier.stopping()


async def _serve_then_end(
    config: Config,
    sockets: list[socket.socket],
    stop: trio.Event,
    running: Running,
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(config, sockets=sockets, stop=stop, running=running, task_status=task_status)
    done.cancel()  # served and stopped: the endpoint, signal receivers and parent watch end too


async def _stop_on_signal(stop: trio.Event) -> None:
    # Signals keep being taken until serving ends: a worker gets Ctrl-C from the terminal and
    # SIGTERM from its supervisor, and the second must not kill it mid-way through stopping.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()


def _serve_worker(launch: Launch) -> Callable[[list[socket.socket], int, int], None]:
    def serve_one(sockets: list[socket.socket], parent: int, number: int) -> None:
        trio.run(serve_process, launch, sockets, parent, number)

    return serve_one


def _parent_reload(launch: Launch) -> Callable[[], None]:
    def reload() -> None:
        # The workers log and count what happens; the parent only keeps the configuration a
        # worker restarted from now on must start with.
        try:
            applied = plan_reload(launch.config, launch.rebuild(launch.config))[0]
        except ConfigError:
            return
        launch.config = applied
        configure_logging(applied.log_level, applied.log_format, workers=applied.workers)

    return reload
