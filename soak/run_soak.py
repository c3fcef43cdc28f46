"""Soak dot-proxy: minutes of mixed load while its upstreams die and come back.

    python soak/run_soak.py --minutes 10 --out docs/soak.md       # what `nox -s soak` runs
    python soak/run_soak.py --minutes 1 --kill-every 15 --out /tmp/soak.md

All on loopback: two unbound upstreams serving the test zone over DoT (same trustme PKI), one
dot-proxy forwarding to both, and for the whole run one UDP and one TCP dnsperf at a fixed
rate, with a timeout above the proxy's deadline. Every ``--kill-every`` seconds one unbound is
killed (SIGKILL, or SIGSTOP and SIGKILL later) and restarted on its ports; a garbage sender
and a slowloris client run beside. The proxy runs with ``--metrics``, and every figure about
it (RSS, open FDs, CPU, queries, SERVFAILs, upstreams up, and the counters at the end) is read
from its own /metrics, as an operator's Prometheus would.
Writes the markdown report and a PNG chart; exits 1 unless no query was lost and RSS and FDs
stayed flat (``soak/report.py`` says how that is judged).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import actors
from report import LoadResult, SoakRun, render_markdown, verdicts, write_chart

from dot_proxy.testing import observability, realdns

ROOT = Path(__file__).resolve().parents[1]

PROXY_DEADLINE = 5.0  # dot-proxy's default --timeout
_INTERVAL = re.compile(r"^(\d+\.\d+): (\d+\.\d+)$", re.MULTILINE)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=10, help="length of the load (default: 10)")
    add("--kill-every", type=float, default=30, help="seconds between faults (default: 30)")
    add("--frozen-for", type=float, default=3, help="SIGSTOP lasts this long before SIGKILL")
    # 1000 + 1000 q/s is about half of what the proxy does on one core of a small machine
    # (2 vCPUs: ~4,500 q/s at 100% CPU): loaded, with headroom for the faults' extra work.
    add("--qps", type=int, default=1000, help="rate of each dnsperf (default: 1000)")
    add("--clients", type=int, default=4, help="dnsperf clients (TCP connections) each")
    add("--timeout", type=float, default=8, help="dnsperf -t, above the proxy's 5 s deadline")
    add("--sample-every", type=float, default=10, help="seconds between samples (default: 10)")
    add("--garbage-rate", type=float, default=20, help="garbage datagrams per second")
    add("--slowloris", type=int, default=16, help="half-frame connections held open")
    add("--proxy-args", default="", help="extra dot-proxy arguments (shell-quoted)")
    add("--out", type=Path, default=ROOT / "docs" / "soak.md", help="markdown report")
    add("--chart", type=Path, help="PNG chart (default: the report's path with .png)")
    add("--no-chart", action="store_true", help="skip the chart (no matplotlib needed)")
    add("--workdir", type=Path, help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.timeout <= PROXY_DEADLINE:
        parser.error(f"--timeout must be above the proxy's {PROXY_DEADLINE:g} s deadline")
    if args.chart is None:
        args.chart = args.out.with_suffix(".png")
    return args


def ensure_tools() -> None:
    """Install unbound and dnsperf when root (as bench/run_bench.py does); else exit with a hint."""
    missing = realdns.missing_tools("unbound", "dnsperf")
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing: {', '.join(missing)}; run: sudo apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)  # a fresh container
        subprocess.run(install, env=env, check=True)


# --- dnsperf -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Load:
    """A dnsperf running in the background, its output going to files (never a pipe)."""

    mode: str
    argv: list[str]
    stdout: Path
    stderr: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def start_dnsperf(
    stack: contextlib.ExitStack, mode: str, port: int, queries: Path, args: argparse.Namespace
) -> Load:
    seconds = round(args.minutes * 60)
    argv = [
        "dnsperf",
        *("-s", actors.LOOPBACK, "-p", str(port), "-d", str(queries), "-m", mode),
        *("-c", str(args.clients), "-l", str(seconds), "-t", f"{args.timeout:g}"),
        *("-Q", str(args.qps), "-S", f"{args.sample_every:g}"),
        # Outstanding queries at most half the proxy's --max-in-flight (2000) each: then a
        # lost UDP query is never one the proxy dropped because dnsperf overfilled it.
        *("-q", "1000"),
    ]
    workdir = queries.parent
    load = Load(mode, argv, workdir / f"dnsperf-{mode}.out", workdir / f"dnsperf-{mode}.err")
    with load.stdout.open("wb") as out, load.stderr.open("wb") as err:
        load.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    stack.callback(_stop_process, load.process)
    return load


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def finish(load: Load, started_wall: float, clients: int) -> LoadResult:
    """Parse a finished dnsperf's summary and interval lines."""
    text = load.stdout.read_text(errors="replace")
    if load.process is None or load.process.returncode != 0:
        raise realdns.RealDnsError(f"{shlex.join(load.argv)} failed:\n{text}")
    result = realdns.parse_dnsperf(
        text, command=shlex.join(load.argv), mode=load.mode, clients=clients
    )
    intervals = tuple(
        (float(stamp) - started_wall, float(rate)) for stamp, rate in _INTERVAL.findall(text)
    )
    timeouts = load.stderr.read_text(errors="replace").count("Timeout")
    return LoadResult(result, intervals, timeouts)


# --- the run -----------------------------------------------------------------------------------


def wait_for(
    loads: Sequence[Load], workers: Sequence[actors.Worker], proxy: realdns.DotProxy, limit: float
) -> None:
    """Until every dnsperf exits; raise early if an actor failed or the proxy died."""
    deadline = time.monotonic() + limit
    while any(load.process is not None and load.process.poll() is None for load in loads):
        for worker in workers:
            if worker.error is not None:
                raise RuntimeError(f"soak actor {worker.name} failed") from worker.error
        if proxy.process.poll() is not None:
            raise RuntimeError(f"dot-proxy exited with {proxy.process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("dnsperf did not finish in time")
        time.sleep(0.5)


@dataclass(slots=True)
class Record:
    """What the side actors record while they run (each field has one writer thread)."""

    kills: list[actors.Kill] = field(default_factory=list)
    samples: list[actors.Sample] = field(default_factory=list)
    garbage: actors.GarbageStats = field(default_factory=actors.GarbageStats)
    slowloris: actors.SlowlorisStats = field(default_factory=actors.SlowlorisStats)


def start_actors(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    *,
    unbounds: Sequence[tuple[str, realdns.Unbound]],
    proxy: realdns.DotProxy,
    metrics_port: int,
    started: float,
    record: Record,
) -> list[actors.Worker]:
    """Start the side actors in ``stack``; what they record goes into ``record``."""
    targets = {
        "sampler": functools.partial(
            actors.sample_proxy,
            metrics_port=metrics_port,
            interval=args.sample_every,
            started=started,
            samples=record.samples,
        ),
        "killer": functools.partial(
            actors.kill_upstreams,
            upstreams=unbounds,
            interval=args.kill_every,
            frozen_for=args.frozen_for,
            started=started,
            kills=record.kills,
        ),
        "garbage": functools.partial(
            actors.send_garbage, port=proxy.port, rate=args.garbage_rate, stats=record.garbage
        ),
        "slowloris": functools.partial(
            actors.hold_slowloris,
            port=proxy.port,
            connections=args.slowloris,
            stats=record.slowloris,
        ),
    }
    return [stack.enter_context(actors.Worker(name, target)) for name, target in targets.items()]


def soak(args: argparse.Namespace, workdir: Path) -> SoakRun:
    """Start everything, run the load, stop everything; what was measured."""
    with contextlib.ExitStack() as stack:
        pki = realdns.make_pki(workdir / "pki")
        queries = realdns.write_queries(workdir / "queries.txt")
        unbounds = [
            (name, stack.enter_context(realdns.Unbound(pki, workdir=workdir / f"unbound-{name}")))
            for name in ("a", "b")
        ]
        metrics_port = realdns.free_port("tcp")
        proxy = stack.enter_context(
            realdns.DotProxy(
                pki,
                [unbound.upstream_spec for _, unbound in unbounds],
                extra_args=[
                    "--metrics",
                    f"{actors.LOOPBACK}:{metrics_port}",
                    *shlex.split(args.proxy_args),
                ],
                workdir=workdir / "dot-proxy",
            )
        )
        print(f"dot-proxy on port {proxy.port}: {proxy.command}", flush=True)
        started, started_wall = time.monotonic(), time.time()
        loads = [start_dnsperf(stack, mode, proxy.port, queries, args) for mode in ("udp", "tcp")]
        record = Record()
        with contextlib.ExitStack() as side:
            workers = start_actors(
                side,
                args,
                unbounds=unbounds,
                proxy=proxy,
                metrics_port=metrics_port,
                started=started,
                record=record,
            )
            wait_for(loads, workers, proxy, args.minutes * 60 + args.timeout + 60)
        # The actors have stopped: their records are final, and one last sample is taken.
        alive = proxy.process.poll() is None
        final: dict[str, float] = {}
        if alive:
            record.samples.append(actors.sample_once(metrics_port, started))
            final = observability.scrape(metrics_port)
        log = proxy.log_text()
        return SoakRun(
            command_line=shlex.join(["python", "soak/run_soak.py", *args.argv]),
            minutes=args.minutes,
            kill_every=args.kill_every,
            loads=tuple(finish(load, started_wall, args.clients) for load in loads),
            samples=tuple(record.samples),
            kills=tuple(record.kills),
            garbage=record.garbage,
            slowloris=record.slowloris,
            slowloris_connections=args.slowloris,
            servers=(
                *((f"unbound {name}", unbound.command) for name, unbound in unbounds),
                ("dot-proxy", proxy.command),
            ),
            proxy_down_events=log.count(" is down"),
            proxy_back_events=log.count("answers again"),
            proxy_alive=alive,
            warmup=warmup(args),
            final_metrics=final,
        )


def warmup(args: argparse.Namespace) -> float:
    """Seconds after which RSS and FDs must stay flat: once the first fault of each kind
    (SIGKILL, then SIGSTOP) has set its high-water mark, but at most a third of the run."""
    first_of_each = 2 * args.kill_every + args.frozen_for + args.sample_every
    return float(min(args.minutes * 60 / 3, first_of_each))


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dot-proxy-soak-") as name:
        yield Path(name)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM (nox, CI, a terminal closing) unwinds like Ctrl-C: every subprocess is stopped
    # by the ExitStacks on the way out.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    ensure_tools()
    if not args.no_chart:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            sys.exit("matplotlib is missing: pip install matplotlib (or pass --no-chart)")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(f"soaking for {args.minutes:g} min, a fault every {args.kill_every:g} s", flush=True)
    with _workdir(args.workdir) as workdir:
        run = soak(args, workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chart = None if args.no_chart else os.path.relpath(args.chart, args.out.parent)
    args.out.write_text(render_markdown(run, chart=chart))
    if not args.no_chart:
        write_chart(run, args.chart)
    for load in run.loads:
        r = load.result
        print(
            f"{r.mode}: sent {r.queries_sent}, answered {r.queries_completed}, "
            f"SERVFAIL {load.servfail}, lost {r.queries_lost}"
        )
    results = verdicts(run)
    for verdict in results:
        print(f"{'PASS' if verdict.passed else 'FAIL'}: {verdict.name} {verdict.detail}")
    print(f"wrote {args.out}" + ("" if args.no_chart else f" and {args.chart}"))
    return 0 if all(verdict.passed for verdict in results) else 1


if __name__ == "__main__":
    sys.exit(main())
