"""How often the cyclic garbage collector runs under load, and how long its passes take.

    python bench/investigations/gc_passes.py --seconds 10              # the proxy's setting
    python bench/investigations/gc_passes.py --seconds 10 --thresholds 700,10,10  # CPython's

Runs dot-proxy in this process (its ``serve``, default configuration, one upstream) against a
local unbound over DoT, with the collector set up as ``cli.main`` sets it up (``gc.freeze``
and the thresholds, here ``--thresholds``), drives it with dnsperf at maximum load and counts
every pass through ``gc.callbacks``: how many per generation, their median and longest, and
their total as a share of the run. The pass counts are the steady figure; the
times swing with this host's speed like everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dot_proxy import cli
from dot_proxy.testing import realdns

# inprocess.py, the maintained in-process runner, is in bench/: one folder up from this
# script's own, which is the only one Python puts on a script's path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inprocess import run_under_dnsperf


class PassTimer:
    """A ``gc.callbacks`` entry: the length of every pass, by generation."""

    def __init__(self) -> None:
        self.passes: dict[int, list[float]] = defaultdict(list)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.passes[info["generation"]].append(time.perf_counter() - self._started)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--seconds", type=float, default=10, help="length of the measured run (default: 10)")
    add("--transport", choices=("udp", "tcp"), default="udp", help="dnsperf's transport")
    add("--clients", type=int, default=20, help="dnsperf clients (default: 20)")
    proxys = ",".join(map(str, cli.GC_THRESHOLDS))
    add(
        "--thresholds",
        type=_thresholds,
        default=cli.GC_THRESHOLDS,
        help=f"the collector's three thresholds (default: the proxy's, {proxys})",
    )
    return parser.parse_args(argv)


def _thresholds(text: str) -> tuple[int, int, int]:
    values = tuple(int(part) for part in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("three numbers: youngest,middle,oldest")
    return values[0], values[1], values[2]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timer = PassTimer()

    @contextlib.contextmanager
    def timed() -> Iterator[None]:
        # As cli.main sets up the collector before serving.
        gc.freeze()
        gc.set_threshold(*args.thresholds)
        gc.callbacks.append(timer)
        try:
            yield
        finally:
            gc.callbacks.remove(timer)

    result = run_under_dnsperf(
        transport=args.transport, clients=args.clients, seconds=args.seconds, during=timed
    )
    _report(args, timer, result)
    return 0


def _report(args: argparse.Namespace, timer: PassTimer, result: realdns.DnsperfResult) -> None:
    print(
        f"python bench/investigations/gc_passes.py --seconds {args.seconds:g} "
        f"--transport {args.transport} "
        f"--clients {args.clients} --thresholds {','.join(map(str, args.thresholds))}"
    )
    print(f"{result.qps:,.0f} queries/s, {result.queries_lost} lost")
    total = 0.0
    for generation in (0, 1, 2):
        times = timer.passes.get(generation, [])
        total += sum(times)
        if times:
            print(
                f"generation {generation}: {len(times):5} passes, median "
                f"{statistics.median(times) * 1e6:7.0f} µs, longest {max(times) * 1e6:7.0f} µs, "
                f"total {sum(times) * 1e3:6.1f} ms"
            )
        else:
            print(f"generation {generation}:     0 passes")
    print(f"all passes: {total * 1e3:.1f} ms, {total / result.run_time:.1%} of the run")


if __name__ == "__main__":
    sys.exit(main())
