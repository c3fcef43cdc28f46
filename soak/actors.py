"""The soak's side actors, each a loop in a thread until told to stop.

- :func:`kill_upstreams`: every ``interval`` seconds, kill one unbound (alternating upstreams
  and ways: SIGKILL, or SIGSTOP and later SIGKILL) and restart it on the same ports;
- :func:`send_garbage`: random datagrams and TCP junk at a low rate;
- :func:`hold_slowloris`: TCP connections that send half a frame and wait to be closed;
- :func:`sample_proxy`: the proxy's RSS, open file descriptors and CPU time.

Each records what it did in a dataclass the report reads. They share nothing but the
``threading.Event`` that stops them; :class:`Worker` keeps a thread's exception for the caller.
"""

from __future__ import annotations

import contextlib
import random
import select
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from dot_proxy.testing import observability, realdns

__all__ = [
    "GarbageStats",
    "Kill",
    "Sample",
    "SlowlorisStats",
    "Worker",
    "hold_slowloris",
    "kill_upstreams",
    "sample_proxy",
    "send_garbage",
]

LOOPBACK = "127.0.0.1"


class Worker:
    """A daemon thread running ``target(stop)``; joined, and its exception kept, on exit.

    Resource handling: leaving the context sets ``stop`` and joins the thread (each actor
    checks ``stop`` at least once a second).
    """

    def __init__(self, name: str, target: Callable[[threading.Event], None]) -> None:
        self.name = name
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._target(self.stop)
        except BaseException as exc:  # kept for the main thread, which decides what to do
            self.error = exc

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop.set()
        self._thread.join(timeout=30)


# --- killing and restarting upstreams ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kill:
    """One fault: which upstream, how, when (seconds since start), and how long it was gone."""

    at: float
    upstream: str
    how: str  # "SIGKILL" or "SIGSTOP+SIGKILL"
    down_for: float  # from the first signal until the restarted unbound answered


def kill_upstreams(
    stop: threading.Event,
    upstreams: Sequence[tuple[str, realdns.Unbound]],
    *,
    interval: float,
    frozen_for: float,
    started: float,
    kills: list[Kill],
) -> None:
    """Every ``interval`` s, take the next upstream down and bring it back on the same ports.

    Odd faults SIGKILL at once (connections reset: the proxy must fail over); even ones
    SIGSTOP first and SIGKILL ``frozen_for`` s later (connections hang open: only the proxy's
    own timers can notice). ``Unbound.restart`` reuses the ports, so the proxy's upstream
    specs stay valid.
    """
    count = 0
    while not stop.wait(interval):
        name, unbound = upstreams[count % len(upstreams)]
        freeze = count % 2 == 1
        count += 1
        down_at = time.monotonic()
        if freeze:
            unbound.process.send_signal(signal.SIGSTOP)
            stop.wait(frozen_for)
        unbound.process.kill()
        unbound.process.wait()
        unbound.restart()
        kills.append(
            Kill(
                at=down_at - started,
                upstream=name,
                how="SIGSTOP+SIGKILL" if freeze else "SIGKILL",
                down_for=time.monotonic() - down_at,
            )
        )


# --- garbage -----------------------------------------------------------------------------------


@dataclass(slots=True)
class GarbageStats:
    datagrams: int = 0
    replies: int = 0  # the proxy answers some garbage (FORMERR), drops the rest
    junk_connections: int = 0


def send_garbage(
    stop: threading.Event, port: int, *, rate: float, stats: GarbageStats, seed: int = 7
) -> None:
    """Random datagrams at ``rate``/s; every 20th time, a TCP connection that sends junk."""
    rng = random.Random(seed)  # the same garbage every run
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setblocking(False)
        while not stop.wait(1 / rate):
            udp.sendto(rng.randbytes(rng.randint(1, 600)), (LOOPBACK, port))
            stats.datagrams += 1
            stats.replies += _drain(udp)
            if stats.datagrams % 20 == 0:
                _send_junk_connection(port, rng)
                stats.junk_connections += 1


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return count
        count += 1


def _send_junk_connection(port: int, rng: random.Random) -> None:
    # Junk over TCP: a random length prefix and bytes, then wait briefly for the proxy's
    # reaction (an answer, a close, or nothing) and hang up.
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as conn:
            conn.sendall(rng.randbytes(rng.randint(1, 300)))
            conn.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                conn.recv(65535)
    except OSError:
        pass  # refused or reset: also an acceptable reaction to junk


# --- slowloris ---------------------------------------------------------------------------------


@dataclass(slots=True)
class SlowlorisStats:
    opened: int = 0
    closed_by_proxy: int = 0
    held_for: list[float] = field(default_factory=list)  # seconds until the proxy closed one

    def summary(self) -> str:
        if not self.held_for:
            return f"{self.opened} opened, none closed by the proxy yet"
        return (
            f"{self.opened} opened, {self.closed_by_proxy} closed by the proxy after "
            f"{min(self.held_for):.1f}-{max(self.held_for):.1f} s "
            f"(median {statistics.median(self.held_for):.1f} s)"
        )


# A frame that announces 100 bytes and delivers 10 (RFC 1035 §4.2.2 length prefix).
HALF_FRAME = (100).to_bytes(2, "big") + bytes(10)


def hold_slowloris(
    stop: threading.Event, port: int, *, connections: int, stats: SlowlorisStats
) -> None:
    """Keep ``connections`` half-frame connections open; replace each one the proxy closes."""
    held: dict[socket.socket, float] = {}
    try:
        while not stop.is_set():
            while len(held) < connections:
                held[_open_half_frame(port)] = time.monotonic()
                stats.opened += 1
            readable, _, _ = select.select(list(held), [], [], 1.0)
            for conn in readable:
                if _closed(conn):
                    stats.closed_by_proxy += 1
                    stats.held_for.append(time.monotonic() - held.pop(conn))
                    conn.close()
    finally:
        for conn in held:
            conn.close()


def _open_half_frame(port: int) -> socket.socket:
    conn = socket.create_connection((LOOPBACK, port), timeout=5)
    conn.sendall(HALF_FRAME)
    conn.setblocking(False)
    return conn


def _closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(65535) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


# --- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """The proxy at one moment, as its /metrics told it: seconds since start, RSS, open FDs and
    CPU seconds (summed over workers), queries read, SERVFAIL sent, upstreams up."""

    at: float
    rss_bytes: int
    fds: int
    cpu_seconds: float
    queries: int = 0
    servfail: int = 0
    upstreams_up: int = 0


def sample_once(metrics_port: int, started: float) -> Sample:
    """Scrape the proxy's own /metrics, as an operator's Prometheus would."""
    metrics = observability.scrape(metrics_port)
    total = observability.total
    return Sample(
        at=time.monotonic() - started,
        rss_bytes=int(total(metrics, "process_resident_memory_bytes")),
        fds=int(total(metrics, "process_open_fds")),
        cpu_seconds=total(metrics, "process_cpu_seconds_total"),
        queries=int(total(metrics, "dot_proxy_queries_total")),
        servfail=int(total(metrics, "dot_proxy_responses_total", rcode="SERVFAIL")),
        upstreams_up=int(total(metrics, "dot_proxy_upstream_up")),
    )


def sample_proxy(
    stop: threading.Event,
    metrics_port: int,
    *,
    interval: float,
    started: float,
    samples: list[Sample],
) -> None:
    """Append a :class:`Sample` every ``interval`` seconds (the first at once)."""
    samples.append(sample_once(metrics_port, started))
    while not stop.wait(interval):
        samples.append(sample_once(metrics_port, started))
