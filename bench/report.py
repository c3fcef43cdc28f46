"""The benchmark's results: what was measured, and the table, report and chart made of it."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dot_proxy.testing import realdns

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Target:
    """One system under test: where dnsperf sends, and whose CPU and memory we sample.

    ``kind``: "forwarding" (every query goes upstream), "cache" (answers from its cache) or
    "floor" (the bare trio loop, no DNS at all).
    """

    name: str
    port: int
    transports: tuple[realdns.DnsperfMode, ...]
    pid: int
    command: str
    config: tuple[Path, ...] = ()
    kind: str = "forwarding"


@dataclass(frozen=True, slots=True)
class LoadRun:
    target: str
    transport: str
    round: int
    result: realdns.DnsperfResult
    cpu_us: float
    rss: int
    upstream_queries: int | None = None  # asked of the upstream during the run (cache rows)


@dataclass(frozen=True, slots=True)
class Fill:
    """How a caching system was filled before measuring: every name of the zone once over
    UDP, then each hit name once on each transport."""

    target: str
    command: str  # the fill's dnsperf
    sent: int
    answered: int  # NOERROR answers to the fill
    warm_commands: tuple[str, ...]  # the hit names, once per transport
    upstream_queries: int  # asked of the upstream by the fill and the warm-up together
    rss: int  # VmRSS after


@dataclass(frozen=True, slots=True)
class LatencyRun:
    target: str
    transport: str
    round: int
    latencies: tuple[float, ...]
    lost: int
    command: str


@dataclass(frozen=True, slots=True)
class Measurements:
    """Everything one benchmark run produced, for the report."""

    targets: tuple[Target, ...]
    loads: tuple[LoadRun, ...]
    latencies: tuple[LatencyRun, ...]
    configs: tuple[tuple[str, str], ...]  # (file name, text)
    peak_rss: Mapping[str, int]  # target name -> VmHWM at the end
    query_count: int
    # 1-minute load average before and after: a busy shared machine explains noisy rounds.
    loadavg_before: float
    loadavg_after: float
    command_line: str
    rounds: int
    clients: int
    seconds: float
    latency_qps: int
    latency_seconds: float
    fills: tuple[Fill, ...] = ()
    hit_count: int = 0  # lines of the hit file
    fill_count: int = 0  # lines of the fill file: distinct names with data in the zone
    zone: str = ""  # what the upstream serves, in a few words
    workdir: str = ""  # the run's temporary directory, written $WORKDIR in the report


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a system over one transport, summarized over the rounds."""

    target: str
    transport: str
    kind: str
    qps: float
    qps_min: float
    qps_max: float
    lost: int
    lost_low_rate: int
    latency_avg: float
    p50: float
    p99: float
    cpu_us: float
    peak_rss: int
    rss_first: int  # after the first max-load run and after the last: is memory flat?
    rss_last: int
    upstream_queries: int | None  # summed over the max-load runs, where counted


def summarize(measured: Measurements) -> list[Row]:
    targets, loads, latencies = measured.targets, measured.loads, measured.latencies
    rows = []
    for target in targets:
        for transport in target.transports:
            key = (target.name, transport)
            mine = [run for run in loads if (run.target, run.transport) == key]
            low = [run for run in latencies if (run.target, run.transport) == key]
            lat = sorted(value for run in low for value in run.latencies)
            qps = [run.result.qps for run in mine]
            rows.append(
                Row(
                    target=target.name,
                    transport=transport,
                    kind=target.kind,
                    qps=statistics.median(qps),
                    qps_min=min(qps),
                    qps_max=max(qps),
                    lost=sum(run.result.queries_lost for run in mine),
                    lost_low_rate=sum(run.lost for run in low),
                    latency_avg=statistics.fmean(lat) if lat else float("nan"),
                    p50=realdns.percentile(lat, 50) if lat else float("nan"),
                    p99=realdns.percentile(lat, 99) if lat else float("nan"),
                    cpu_us=statistics.median(run.cpu_us for run in mine),
                    peak_rss=measured.peak_rss[target.name],
                    rss_first=mine[0].rss,
                    rss_last=mine[-1].rss,
                    upstream_queries=_total(run.upstream_queries for run in mine),
                )
            )
    return rows


def _total(values: Iterable[int | None]) -> int | None:
    counted = [value for value in values if value is not None]
    return sum(counted) if counted else None


def find_row(rows: Sequence[Row], target: str, transport: str) -> Row | None:
    return next((r for r in rows if (r.target, r.transport) == (target, transport)), None)


def ratio(row: Row, rows: Sequence[Row], reference: str) -> str:
    """``row``'s queries/s over ``reference``'s on the same transport (any, for the limit)."""
    for other in rows:
        same_transport = other.transport == row.transport or reference == "limit"
        if other.target == reference and same_transport:
            return f"{row.qps / other.qps:.2f}x" if other is not row else "1x"
    return "-"


def render_table(
    rows: Sequence[Row],
    *,
    references: Sequence[str] = ("stubby", "dnsdist", "limit"),
    all_rows: Sequence[Row] | None = None,
    extra: Sequence[tuple[str, Callable[[Row], str]]] = (),
) -> str:
    """A markdown table of ``rows``: the measured columns, then ``extra`` columns (title, cell),
    then the throughput ratio to each of ``references``, looked up in ``all_rows``."""
    pool = rows if all_rows is None else all_rows
    titles = [
        "system",
        "transport",
        "queries/s (median)",
        "min-max",
        "lost",
        "latency avg ms",
        "p50 ms",
        "p99 ms",
        "CPU µs/query",
        "peak RSS MiB",
        "RSS MiB first-last",
        *(title for title, _ in extra),
        *(f"x {name}" for name in references),
    ]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        lost = f"{row.lost}" + (f" (+{row.lost_low_rate} low rate)" if row.lost_low_rate else "")
        cells = [
            row.target,
            row.transport,
            f"{row.qps:,.0f}",
            f"{row.qps_min:,.0f}-{row.qps_max:,.0f}",
            lost,
            f"{row.latency_avg * 1e3:.3f}",
            f"{row.p50 * 1e3:.3f}",
            f"{row.p99 * 1e3:.3f}",
            f"{row.cpu_us:.1f}",
            f"{row.peak_rss / MIB:.1f}",
            f"{row.rss_first / MIB:.1f}-{row.rss_last / MIB:.1f}",
            *(cell(row) for _, cell in extra),
            *(ratio(row, pool, name) for name in references),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_baseline(rows: Sequence[Row]) -> str:
    """dot-proxy against the build it is compared with (``--baseline``), or "" if none."""
    lines = []
    for base in rows:
        if not base.target.startswith("dot-proxy@"):
            continue
        for row in rows:
            if row.target == "dot-proxy" and row.transport == base.transport:
                lines.append(
                    f"- {row.transport.upper()}: {row.qps / base.qps:.2f}x the queries/s of "
                    f"{base.target} ({row.qps:,.0f} against {base.qps:,.0f}), "
                    f"{row.cpu_us / base.cpu_us:.2f}x its CPU per query "
                    f"({row.cpu_us:.1f} against {base.cpu_us:.1f} µs)"
                )
    if not lines:
        return ""
    return "dot-proxy against its baseline, in the same rounds:\n" + "\n".join(lines)


def tool_versions() -> dict[str, str]:
    # dot-proxy's version from this interpreter's dot_proxy, the one the benchmark runs.
    env = realdns.dot_proxy_environment()

    def first_line(argv: list[str], contains: str = "") -> str:
        if shutil.which(argv[0]) is None:
            return "not installed"
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        lines = (done.stdout + done.stderr).splitlines()
        return next((line for line in lines if contains in line and line.strip()), "?").strip()

    return {
        "unbound": first_line(["unbound", "-V"], "Version"),
        "dnsdist": first_line(["dnsdist", "--version"], "dnsdist"),
        "stubby": first_line(["stubby", "-V"], "Stubby"),
        "dnsperf": first_line(["dnsperf", "-h"], "Version"),
        "dot-proxy": first_line([sys.executable, "-m", "dot_proxy", "--version"], "dot-proxy"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "OpenSSL (python)": ssl.OPENSSL_VERSION,
        "kernel": platform.release(),
        "CPU": _cpu_model(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{os.cpu_count()} x {line.split(':', 1)[1].strip()}"
    return f"{os.cpu_count()} CPUs"


def public(text: str, measured: Measurements) -> str:
    """``text`` without this machine's paths: the run's directory as ``$WORKDIR``, this
    interpreter as ``python``, the checkout's root left out."""
    if measured.workdir:
        text = text.replace(measured.workdir, "$WORKDIR")
    return text.replace(sys.executable, "python").replace(f"{ROOT}/", "")


def render_markdown(
    rows: Sequence[Row], measured: Measurements, *, chart: str | None, cache_section: str = ""
) -> str:
    """The report: tables, how to read them, versions, commands and configuration files."""
    m = measured
    forwarding = [row for row in rows if row.kind == "forwarding"]
    versions = "\n".join(f"- {name}: `{value}`" for name, value in tool_versions().items())
    servers = "\n".join(f"- {t.name}: `{t.command}`" for t in measured.targets)
    commands = sorted(
        {run.result.command for run in measured.loads} | {run.command for run in measured.latencies}
    )
    config_blocks = "\n\n".join(
        f"<details><summary>{name}</summary>\n\n```\n{text}```\n</details>"
        for name, text in measured.configs
    )
    image = "" if chart is None else f"\n![throughput and latency]({chart})\n"
    cache_files = (
        f"; the cache rows' `hits.txt` is {m.hit_count} names of the zone, `fill.txt` every"
        f" name of the zone with data, {m.fill_count:,} lines"
        if m.fill_count
        else ""
    )
    text = f"""# Benchmarks

Generated by `{m.command_line}` on \
{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. All on loopback: one unbound
serves the zone `test.` ({m.zone or "local data"}) over DoT (trustme certificate for `dns.test`,
one thread, no cache involved: local data); every system forwards to it over TLS and verifies
that certificate. Machine load average (1 min) {m.loadavg_before:.2f} before, \
{m.loadavg_after:.2f} after.

## Forwarding

Every query goes upstream: dot-proxy runs with `--cache-size 0` in these rows.

{render_table(forwarding)}
{image}{_baseline_section(forwarding)}
- **queries/s**: median of {m.rounds} rounds of `dnsperf` at maximum load, {m.clients}
  clients, {m.seconds:g} s each; min-max over the rounds. Rounds interleave the systems
  (order rotated each round) so drift on this shared machine hits all alike.
- **lost**: queries dnsperf gave up on (5 s timeout), summed over the max-load rounds (and,
  if any, over the low-rate runs).
- **latency**: at {m.latency_qps} queries/s from one client, {m.latency_seconds:g} s per
  round, all rounds pooled; p50/p99 are nearest-rank over the per-answer latencies dnsperf
  prints with `-v` (dnsperf 2.10 has no percentile output). The limit row's latency comes from
  a Python DoT client on one connection, because dnsperf's `-m dot` with `-Q` reports each
  answer only when it sends the next query (its latency equals the query interval).
- **CPU µs/query**: user + system time of the system's process (all threads, from
  `/proc/PID/stat`) over each max-load run, divided by the answers; median over rounds. For
  the limit row that process is unbound itself; for `dot-proxy-workers-2` (`--workers 2`) it is
  the supervisor and its two workers together.
- **peak RSS**: `VmHWM` of the process at the end of the benchmark; **RSS first-last**:
  `VmRSS` after the first and after the last max-load run on that transport. Summed over the
  three processes of `dot-proxy-workers-2`, which share the pages they had when forked: the sum
  counts those more than once.
- **x stubby / x dnsdist**: throughput ratio to that peer on the same transport; **x limit**:
  to dnsperf speaking DoT straight to unbound (dnsperf does not verify the certificate).
- **Padding**: dot-proxy pads its queries to 128-byte blocks (RFC 8467), and unbound then pads
  its answers to 468 bytes; `dot-proxy-no-padding` (`--no-padding`) shows what that costs.
  stubby, configured as below, pads its queries too (to 256 bytes, seen at a recording
  upstream); dnsdist sends them unpadded.
- **dot-proxy@REV** (`--baseline REV`): dot-proxy run from that git revision (a worktree),
  same flags, in the same rounds: a regression shows as a ratio below 1x.
{cache_section}
## Versions

{versions}

## Commands

Servers:

{servers}

dnsperf (the same command every round; the forwarding rows' query file is {m.query_count}
lines of A, AAAA, TXT and NXDOMAIN names from `dot_proxy/testing/realdns/zone.py`{cache_files}):

```
{chr(10).join(commands)}
```

## Configuration

{config_blocks}
"""
    return public(text, measured)


def _baseline_section(rows: Sequence[Row]) -> str:
    text = render_baseline(rows)
    return f"\n{text}\n\n" if text else ""
