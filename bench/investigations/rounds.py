"""Scheduling rounds and task steps per query, with how long each task's steps take.

    python bench/investigations/rounds.py --qps 200 --seconds 4

Runs dot-proxy in this process (its ``serve``, default configuration, one upstream) against a
local unbound over DoT, drives it with dnsperf from one client at a fixed rate, and counts
through a trio Instrument what the run loop did meanwhile: its rounds (one I/O check each:
"blocking" when nothing was runnable, "zero" when tasks were), the steps of each task, and each
step's median and mean time. At low load a query's latency through the proxy is its rounds, and
on this kind of VM every round costs far more than the work it does (caches gone cold between
queries), so the round count is the figure to watch; compare a revision with
``--source PATH`` (another checkout). The instrument's own cost inflates the step times.
``--calls`` also times a few calls inside the steps (the upstream write's encrypt, record and
kernel send; the answer's ``sendto``): compare them at ``--qps 200`` and ``--qps 4000`` to see
how much slower the same C code runs here at low load.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parents[1]  # inprocess.py, the in-process runner


class Counting:
    """A trio Instrument: rounds of the run loop, steps and step times per task."""

    def __init__(self) -> None:
        self.blocking_rounds = 0
        self.zero_rounds = 0
        self.steps: dict[str, list[float]] = collections.defaultdict(list)
        self._step_started: float | None = None

    def before_io_wait(self, timeout: float) -> None:
        if timeout == 0:
            self.zero_rounds += 1
        else:
            self.blocking_rounds += 1

    def before_task_step(self, task: object) -> None:
        self._step_started = time.perf_counter()

    def after_task_step(self, task: object) -> None:
        if self._step_started is not None:
            name = getattr(task, "name", "?").rsplit(".", 1)[-1]
            self.steps[name].append(time.perf_counter() - self._step_started)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--qps", type=int, default=200, help="dnsperf's rate, one client (default: 200)")
    add("--seconds", type=float, default=4, help="length of the counted run (default: 4)")
    add("--transport", choices=("udp", "tcp"), default="udp", help="client transport")
    add("--source", type=Path, default=ROOT, help="dot_proxy from this checkout (default: this)")
    add(
        "--calls",
        action="store_true",
        help="also time the upstream write's three calls (encrypt, take the record, the "
        "kernel's send) and the answer's sendto",
    )
    return parser.parse_args(argv)


class CallTimes:
    """Wall time of a few calls on the query path, by name: what one step is made of."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        times = self.times[name]

        def timed_call(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args)
            finally:
                times.append(time.perf_counter() - started)

        return timed_call

    def install(self) -> None:
        """Wrap the calls in the dot_proxy imported (the one ``--source`` chose)."""
        from dot_proxy.serve import udp as listeners  # noqa: PLC0415
        from dot_proxy.upstream import trio_private as tls  # noqa: PLC0415

        plain_init = tls.EagerSender.__init__

        def init(sender: Any, *args: Any) -> None:
            plain_init(sender, *args)
            sender._write = self.timed("SSLObject.write (encrypt)", sender._write)
            sender._take = self.timed("MemoryBIO.read (take the record)", sender._take)
            send = self.timed("socket.send (to unbound)", sender._socket.send)
            sender._socket = _TimedSocket(sender._socket, send)

        tls.EagerSender.__init__ = init  # type: ignore[method-assign]
        listeners._send_datagram = self.timed("_send_datagram (sendto)", listeners._send_datagram)

    def report(self) -> None:
        print("call                                 calls  median µs  mean µs")
        for name, times in self.times.items():
            if times:
                print(
                    f"{name:<34} {len(times):>11}  {statistics.median(times) * 1e6:9.1f}"
                    f"  {statistics.fmean(times) * 1e6:7.1f}"
                )


class _TimedSocket:
    def __init__(self, sock: Any, send: Callable[..., Any]) -> None:
        self._sock, self.send = sock, send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(BENCH))  # a script's path holds only its own folder
    sys.path.insert(0, str(args.source))  # dot_proxy (and its testing helpers) from that one
    # Imported here, after the path is set, so that --source decides which dot_proxy runs.
    import trio  # noqa: PLC0415
    from inprocess import run_under_dnsperf  # noqa: PLC0415

    calls = CallTimes()
    if args.calls:
        calls.install()
    counting = Counting()

    @contextlib.contextmanager
    def counted() -> Iterator[None]:
        for times in calls.times.values():
            times.clear()  # the warm-up's do not count
        trio.lowlevel.add_instrument(counting)  # type: ignore[arg-type]
        try:
            yield
        finally:
            trio.lowlevel.remove_instrument(counting)  # type: ignore[arg-type]

    result = run_under_dnsperf(
        transport=args.transport, clients=1, seconds=args.seconds, qps=args.qps, during=counted
    )
    _report(args, counting, result.queries_completed, result.latency_avg)
    if args.calls:
        calls.report()
    return 0


def _report(args: argparse.Namespace, counting: Counting, answered: int, latency: float) -> None:
    print(
        f"python bench/investigations/rounds.py --qps {args.qps} --seconds {args.seconds:g} "
        f"--transport {args.transport}  (dot_proxy from {args.source})"
    )
    rounds = counting.blocking_rounds + counting.zero_rounds
    print(
        f"{answered} queries, avg latency {latency * 1e3:.3f} ms (instrumented); "
        f"{rounds / answered:.2f} rounds per query "
        f"({counting.blocking_rounds / answered:.2f} blocking, "
        f"{counting.zero_rounds / answered:.2f} with tasks runnable)"
    )
    print("task                  steps/query  median µs  mean µs")
    for name, times in sorted(counting.steps.items(), key=lambda item: -sum(item[1])):
        if len(times) / answered < 0.05:
            continue  # background ticks (watchdog, prober)
        print(
            f"{name:<21} {len(times) / answered:11.2f}  {statistics.median(times) * 1e6:9.1f}"
            f"  {statistics.fmean(times) * 1e6:7.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
