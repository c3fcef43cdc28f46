"""A/B: this checkout's dot-proxy against another revision's, side by side, in one run.

    python bench/ab.py --base HEAD~1 --seconds 5 --rounds 4

Both proxies forward to one local unbound (DoT, trustme certificate) and dnsperf drives them in
turns, A B B A ..., so that drift on this shared machine hits both alike. It prints each run's
queries/s and proxy CPU per answered query (utime + stime over the run, divided by answers),
then the medians and the ratio B/A. CPU per query is the steady figure here; throughput swings
10-20% from run to run. ``--qps`` fixes the rate instead (latency and CPU at a given load), and
adds p50 and p99 over every answer of every round.

The base revision is checked out with ``git worktree`` into a temporary folder and run from
there with this interpreter, so only dot_proxy's code differs between A and B: each proxy's
``PYTHONPATH`` names its source tree (the worktree for A, this checkout for B), whatever copy
of dot_proxy this interpreter has installed. That installed copy (``pip install .`` with the
``bench`` dependency group, or ``nox -s ab -- --base REV``, which does both) gives this script
its helpers, ``dot_proxy.testing.realdns``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from dot_proxy.testing import realdns

ROOT = Path(__file__).resolve().parents[1]


class ProxyFrom(realdns.DotProxy):
    """dot-proxy run from the source tree ``source`` (its ``dot_proxy`` package first)."""

    def __init__(self, source: Path, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.source = source

    def _environment(self) -> dict[str, str] | None:
        env = super()._environment() or {}
        env["PYTHONPATH"] = str(self.source)
        return env


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A checkout of ``revision`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dot-proxy-ab-") as parent:
        path = Path(parent) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), revision],
            check=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--base", default="HEAD", help="revision for A (default: HEAD; B is the work tree)")
    add("--seconds", type=float, default=5, help="length of each run (default: 5)")
    add("--rounds", type=int, default=4, help="A/B pairs per transport (default: 4)")
    add("--clients", type=int, default=20, help="dnsperf clients (default: 20)")
    add("--qps", type=int, default=None, help="fixed rate instead of maximum load")
    add("--transports", default="udp,tcp", help="comma-separated: udp, tcp (default: both)")
    add("--args-a", default="", help="extra dot-proxy flags for A")
    add("--args-b", default="", help="extra dot-proxy flags for B")
    add("--upstreams", type=int, default=1, help="unbound instances, one --upstream each")
    return parser.parse_args(argv)


def run_once(
    proxy: realdns.DotProxy,
    queries: Path,
    transport: str,
    args: argparse.Namespace,
    latencies: list[float],
) -> tuple[float, float, float]:
    """queries/s, CPU µs per answer and average latency (ms) of one dnsperf run.

    At a fixed rate (``--qps``) each answer's latency is added to ``latencies`` too.
    """
    before = realdns.sample_process(proxy.pid)
    result = realdns.run_dnsperf(
        proxy.port,
        queries,
        mode=transport,  # type: ignore[arg-type]
        clients=1 if args.qps else args.clients,
        seconds=args.seconds,
        max_qps=args.qps,
        percentiles=bool(args.qps),
    )
    latencies.extend(result.latencies)
    after = realdns.sample_process(proxy.pid)
    if result.queries_lost:
        print(f"  warning: {result.queries_lost} lost", flush=True)
    cpu = realdns.cpu_us_per_query(before, after, result.queries_completed)
    return result.qps, cpu, result.latency_avg * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(worktree(args.base))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dot-proxy-ab-")))
        pki = realdns.make_pki(work / "pki")
        queries = realdns.write_queries(work / "queries.txt")
        unbounds = [
            stack.enter_context(realdns.Unbound(pki, workdir=work / f"unbound{i}"))
            for i in range(args.upstreams)
        ]
        specs = [u.upstream_spec for u in unbounds]
        proxies = {
            "A": ProxyFrom(
                base, pki, specs, extra_args=shlex.split(args.args_a), workdir=work / "a"
            ),
            "B": ProxyFrom(
                ROOT, pki, specs, extra_args=shlex.split(args.args_b), workdir=work / "b"
            ),
        }
        for name, proxy in proxies.items():
            stack.enter_context(proxy)
            print(f"{name}: {proxy.command}  (from {proxy.source})", flush=True)
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        latencies: dict[tuple[str, str], list[float]] = {}
        for transport in args.transports.split(","):
            for proxy in proxies.values():  # warm-up, unrecorded
                realdns.run_dnsperf(proxy.port, queries, mode=transport, seconds=1)
            for round_ in range(args.rounds):
                order = "AB" if round_ % 2 == 0 else "BA"
                for name in order:
                    qps, cpu, latency = run_once(
                        proxies[name],
                        queries,
                        transport,
                        args,
                        latencies.setdefault((name, transport), []),
                    )
                    results.setdefault((name, transport), []).append((qps, cpu, latency))
                    print(
                        f"{transport} round {round_ + 1} {name}: {qps:9.0f} q/s "
                        f"{cpu:7.1f} µs CPU/query {latency:6.3f} ms avg",
                        flush=True,
                    )
        print(f"\n{shlex.join(['python', 'bench/ab.py', *(argv or sys.argv[1:])])}")
        print("transport  q/s A    q/s B    B/A    µs/q A  µs/q B  B/A    ms A   ms B")
        for transport in args.transports.split(","):
            a = [statistics.median(v) for v in zip(*results[("A", transport)], strict=True)]
            b = [statistics.median(v) for v in zip(*results[("B", transport)], strict=True)]
            print(
                f"{transport:<9} {a[0]:8.0f} {b[0]:8.0f} {b[0] / a[0]:6.3f}  "
                f"{a[1]:6.1f}  {b[1]:6.1f}  {b[1] / a[1]:6.3f}  {a[2]:6.3f} {b[2]:6.3f}"
            )
        if args.qps:
            print("transport  p50 ms A  p50 ms B  B/A    p99 ms A  p99 ms B  B/A  (rounds pooled)")
            for transport in args.transports.split(","):
                a50, a99 = _percentiles(latencies[("A", transport)])
                b50, b99 = _percentiles(latencies[("B", transport)])
                print(
                    f"{transport:<9} {a50:8.3f} {b50:9.3f} {b50 / a50:6.3f}  "
                    f"{a99:8.3f} {b99:9.3f} {b99 / a99:6.3f}"
                )
    return 0


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds, nearest rank."""
    ordered = sorted(latencies)
    last = len(ordered) - 1
    p50 = ordered[min(last, len(ordered) // 2)]
    p99 = ordered[min(last, len(ordered) * 99 // 100)]
    return p50 * 1e3, p99 * 1e3


if __name__ == "__main__":
    sys.exit(main())
