"""Benchmark dot-proxy against stubby, dnsdist and unbound, all on loopback: forwarding, and
answering from a cache.

    python bench/run_bench.py --seconds 5 --rounds 3 --out docs/benchmarks.md
    python bench/run_bench.py --only cache   # the cache rows and what their targets need

One unbound serves the test zone over DoT with a trustme certificate. Every system forwards
to it over TLS, verifying that certificate; dnsperf drives each over UDP and TCP: the
forwarding rows with many names (dot-proxy's cache off), the cache rows with a few names each
system has answered before (``bench/systems.py`` says which system is which). The runs are
interleaved in rounds (each round runs every system once, the order rotated), so drift on a
shared machine hits all systems alike. The report's format is in ``bench/report.py`` and
``bench/cache_report.py``; see issues 3 and 13 for what the numbers are for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import dns.message
from cache_report import Check, cache_checks, render_cache_section
from chart import write_chart
from report import (
    LatencyRun,
    LoadRun,
    Measurements,
    Target,
    render_baseline,
    render_markdown,
    render_table,
    summarize,
)
from systems import (
    FILL_SECONDS,
    ONLY,
    SYSTEMS,
    ZONE,
    QueryFiles,
    ensure_tools,
    fill_caches,
    kind_of,
    start_targets,
    upstream_queries,
    write_query_files,
)

from dot_proxy.testing import realdns

ROOT = Path(__file__).resolve().parents[1]


# --- setup -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--seconds", type=float, default=5, help="length of each max-load run (default: 5)")
    add("--rounds", type=int, default=3, help="rounds over all systems (default: 3)")
    add("--clients", type=int, default=20, help="dnsperf clients at max load (default: 20)")
    add("--latency-qps", type=int, default=200, help="rate of the latency runs (default: 200)")
    add("--latency-seconds", type=float, default=3, help="length of each latency run")
    add("--warmup", type=float, default=1, help="unrecorded run per system first (seconds)")
    add(
        "--systems",
        help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all)",
    )
    add(
        "--only",
        choices=sorted(ONLY),
        help="forwarding: the forwarding rows; cache: the cache rows, with dot-proxy's and "
        "stubby's forwarding rows, which their targets are ratios to",
    )
    add("--proxy-args", default="", help="extra dot-proxy arguments (shell-quoted)")
    add(
        "--baseline",
        metavar="REV",
        help="also run dot-proxy from this git revision, as the system dot-proxy@REV, so that "
        "a regression shows side by side (e.g. cba54aa, the last build before issue 4)",
    )
    add("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown report")
    add("--chart", type=Path, help="PNG chart (default: the report's path with .png)")
    add("--no-chart", action="store_true", help="skip the chart (no matplotlib needed)")
    add("--workdir", type=Path, help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.systems is not None and args.only is not None:
        parser.error("--systems and --only: give one of them")
    if args.systems is None:
        args.systems = ",".join(ONLY[args.only] if args.only else SYSTEMS)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.baseline_name = None
    if args.baseline:
        revision = f"{args.baseline}^{{commit}}"
        check = ["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", revision]
        if subprocess.run(check, capture_output=True, check=False).returncode != 0:
            parser.error(f"--baseline: {args.baseline!r} is not a revision of this repository")
        # Next to dot-proxy, so that the two sit together in the table.
        at = args.systems.index("dot-proxy") + 1 if "dot-proxy" in args.systems else 0
        args.baseline_name = f"dot-proxy@{args.baseline}"
        args.systems.insert(at, args.baseline_name)
    if args.chart is None:
        args.chart = args.out.with_suffix(".png")
    return args


def ensure_python_modules(want_chart: bool) -> None:
    """Fail before minutes of measuring, not after, when the chart cannot be drawn."""
    if want_chart:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            sys.exit("matplotlib is missing: pip install matplotlib (or pass --no-chart)")


# --- measuring ---------------------------------------------------------------------------------


def load_run(
    target: Target,
    transport: realdns.DnsperfMode,
    round_: int,
    queries: Path,
    args: argparse.Namespace,
    count_upstream: Callable[[], int],
) -> LoadRun:
    """One max-load run; for a cache row, also what the upstream was asked meanwhile."""
    counted = target.kind == "cache"
    upstream_before = count_upstream() if counted else 0
    before = realdns.sample_process(target.pid)
    result = realdns.run_dnsperf(
        target.port, queries, mode=transport, clients=args.clients, seconds=args.seconds
    )
    after = realdns.sample_process(target.pid)
    upstream = count_upstream() - upstream_before if counted else None
    cpu = realdns.cpu_us_per_query(before, after, result.queries_completed)
    return LoadRun(target.name, transport, round_, result, cpu, after.rss_bytes, upstream)


def latency_run(
    target: Target,
    transport: realdns.DnsperfMode,
    round_: int,
    queries: Path,
    pki: realdns.Pki,
    args: argparse.Namespace,
) -> LatencyRun:
    if transport == "dot":
        # dnsperf's DoT mode, paced with -Q, reports each answer only when it sends the next
        # query (latency == the gap between queries: 5 ms at 200/s, 1 ms at 1000/s, against
        # unbound answering in ~0.15 ms). So the limit row's latency comes from our own client.
        latencies = dot_latencies(target.port, pki, queries, args.latency_qps, args.latency_seconds)
        command = (
            f"(python DoT client: 1 TLS connection, TCP_NODELAY, {args.latency_qps} q/s, "
            f"{args.latency_seconds:g} s, to 127.0.0.1:{target.port})"
        )
        return LatencyRun(target.name, transport, round_, latencies, 0, command)
    result = realdns.run_dnsperf(
        target.port,
        queries,
        mode=transport,
        clients=1,
        seconds=args.latency_seconds,
        max_qps=args.latency_qps,
        percentiles=True,
    )
    return LatencyRun(
        target.name, transport, round_, result.latencies, result.queries_lost, result.command
    )


def dot_latencies(
    port: int, pki: realdns.Pki, queries: Path, rate: int, seconds: float
) -> tuple[float, ...]:
    """Query one DoT server at a steady rate over one connection; return sorted latencies."""
    questions = [line.split() for line in queries.read_text().splitlines()[: rate * 10]]
    wires = [dns.message.make_query(name, rdtype).to_wire() for name, rdtype in questions]
    latencies = []
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with pki.client_context().wrap_socket(raw, server_hostname=pki.auth_name) as conn:
        _exchange(conn, wires[0])  # the first answer pays for the handshake: not counted
        start = time.perf_counter()
        for index in range(int(rate * seconds)):
            _sleep_until(start + index / rate)
            sent = time.perf_counter()
            _exchange(conn, wires[index % len(wires)])
            latencies.append(time.perf_counter() - sent)
    return tuple(sorted(latencies))


def _exchange(conn: ssl.SSLSocket, wire: bytes) -> bytes:
    conn.sendall(struct.pack("!H", len(wire)) + wire)
    (length,) = struct.unpack("!H", _recv_exactly(conn, 2))
    return _recv_exactly(conn, length)


def _recv_exactly(conn: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_rounds(
    targets: Sequence[Target],
    files: QueryFiles,
    pki: realdns.Pki,
    args: argparse.Namespace,
    count_upstream: Callable[[], int],
) -> tuple[list[LoadRun], list[LatencyRun]]:
    loads: list[LoadRun] = []
    latencies: list[LatencyRun] = []
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(targets)
        order = [*targets[shift:], *targets[:shift]]  # rotated: no system always goes first
        for target in order:
            queries = files.for_target(target)
            for transport in target.transports:
                load = load_run(target, transport, round_, queries, args, count_upstream)
                loads.append(load)
                latencies.append(latency_run(target, transport, round_, queries, pki, args))
                print(
                    f"round {round_}: {target.name:<20} {transport}: "
                    f"{load.result.qps:9.0f} q/s, lost {load.result.queries_lost}, "
                    f"{load.cpu_us:6.1f} µs CPU/query{_upstream_note(load)}",
                    flush=True,
                )
    return loads, latencies


def _upstream_note(load: LoadRun) -> str:
    if load.upstream_queries is None:
        return ""
    note = f", {load.upstream_queries} upstream queries"
    if load.upstream_queries > load.result.queries_completed / 100:
        note += " (warning: more than 1% of the answers: not all hits)"
    return note


def warm_up(targets: Sequence[Target], files: QueryFiles, args: argparse.Namespace) -> None:
    """Fill pools and caches of code before anything is recorded."""
    if args.warmup <= 0:
        return
    for target in targets:
        for transport in target.transports:
            realdns.run_dnsperf(
                target.port,
                files.for_target(target),
                mode=transport,
                clients=args.clients,
                seconds=args.warmup,
            )


# --- main --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dot-proxy-bench-") as name:
        yield Path(name)


def estimate_seconds(args: argparse.Namespace) -> float:
    runs = sum(1 if name in ("limit", "bare-loop") else 2 for name in args.systems)
    per_run = args.seconds + args.latency_seconds + 0.5
    fills = sum(kind_of(name) == "cache" for name in args.systems) * FILL_SECONDS
    return float(runs * (args.rounds * per_run + args.warmup) + fills)


def measure(args: argparse.Namespace, workdir: Path) -> Measurements:
    """Start unbound and the systems, run the rounds, stop them all."""
    with contextlib.ExitStack() as stack:
        pki = realdns.make_pki(workdir / "pki")
        files = write_query_files(workdir)
        unbound = stack.enter_context(
            realdns.Unbound(pki, ZONE, control=True, workdir=workdir / "unbound")
        )
        print(f"started unbound, DoT on port {unbound.tls_port}", flush=True)
        targets = start_targets(stack, args, pki, unbound, workdir)
        loadavg_before = os.getloadavg()[0]
        if loadavg_before > (os.cpu_count() or 1) / 2:
            # Everything here shares the CPUs with whatever else runs: throughput will swing.
            print(f"warning: load average {loadavg_before:.1f} before starting", flush=True)

        def count_upstream() -> int:
            return upstream_queries(unbound)

        fills = fill_caches(targets, files, args.clients, count_upstream)
        warm_up(targets, files, args)
        loads, latencies = run_rounds(targets, files, pki, args, count_upstream)
        configs = (unbound.config_file, *(path for t in targets for path in t.config))
        return Measurements(
            targets=tuple(targets),
            loads=tuple(loads),
            latencies=tuple(latencies),
            configs=tuple((path.name, path.read_text()) for path in configs),
            peak_rss={t.name: realdns.peak_rss_bytes(t.pid) for t in targets},
            query_count=len(files.forwarding.read_text().splitlines()),
            loadavg_before=loadavg_before,
            loadavg_after=os.getloadavg()[0],
            command_line=shlex.join(["python", "bench/run_bench.py", *args.argv]),
            rounds=args.rounds,
            clients=args.clients,
            seconds=args.seconds,
            latency_qps=args.latency_qps,
            latency_seconds=args.latency_seconds,
            fills=tuple(fills),
            hit_count=len(files.hits.read_text().splitlines()),
            fill_count=len(files.fill.read_text().splitlines()),
            zone=f"{ZONE.hosts:,} hosts with A and AAAA, TTL {ZONE.ttl} s",
            workdir=str(workdir),
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    ensure_tools(args.systems)
    ensure_python_modules(not args.no_chart)
    print(f"about {estimate_seconds(args):.0f} s of measuring", flush=True)
    with _workdir(args.workdir) as workdir:
        measured = measure(args, workdir)
    rows = summarize(measured)
    print()
    print(render_table(rows, references=("stubby", "dnsdist", "dot-proxy", "bare-loop")))
    if against := render_baseline(rows):
        print(f"\n{against}")
    checks = cache_checks(measured, rows)
    if any(check.met is not None for check in checks):
        print()
        for check in checks:
            print(f"{check.what}: {check.measured} (goal {check.goal}) {_verdict(check)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chart = None if args.no_chart else os.path.relpath(args.chart, args.out.parent)
    cache = render_cache_section(rows, measured)
    args.out.write_text(render_markdown(rows, measured, chart=chart, cache_section=cache))
    print(f"\nwrote {args.out}")
    if not args.no_chart:
        write_chart(rows, args.chart)
        print(f"wrote {args.chart}")
    return 0


def _verdict(check: Check) -> str:
    return {True: "met", False: "NOT MET", None: ""}[check.met]


if __name__ == "__main__":
    sys.exit(main())
