"""The soak's results: verdicts, the markdown report and the chart."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actors import GarbageStats, Kill, Sample, SlowlorisStats

from dot_proxy.testing import realdns

__all__ = ["LoadResult", "SoakRun", "Verdict", "render_markdown", "verdicts", "write_chart"]

MIB = 1024 * 1024
# Growth allowed between the sample after warm-up and the end: allocator noise and caches
# that fill once, not a leak. A leak of one object per query grows without bound instead.
RSS_SLACK_BYTES = 8 * MIB
RSS_SLACK_SHARE = 0.10
FD_SLACK = 8  # pool connections (4 per upstream) open and close with the faults


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One dnsperf run: its summary, per-interval rates and the timeouts it logged."""

    result: realdns.DnsperfResult
    intervals: tuple[tuple[float, float], ...]  # (seconds since start, queries/s)
    timeout_lines: int

    @property
    def servfail(self) -> int:
        return self.result.rcodes.get("SERVFAIL", 0)


@dataclass(frozen=True, slots=True)
class SoakRun:
    """Everything one soak produced."""

    command_line: str
    minutes: float
    kill_every: float
    loads: tuple[LoadResult, ...]
    samples: tuple[Sample, ...]
    kills: tuple[Kill, ...]
    garbage: GarbageStats
    slowloris: SlowlorisStats
    slowloris_connections: int
    servers: tuple[tuple[str, str], ...]  # (name, command line)
    proxy_down_events: int
    proxy_back_events: int
    proxy_alive: bool
    warmup: float
    final_metrics: Mapping[str, float] = field(default_factory=dict)  # its /metrics at the end


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    passed: bool
    detail: str


def verdicts(run: SoakRun) -> list[Verdict]:
    """Lost queries, RSS and FDs: the three things that must hold."""
    lost = sum(load.result.queries_lost + load.result.queries_interrupted for load in run.loads)
    found = [
        Verdict("proxy alive at the end", run.proxy_alive, "" if run.proxy_alive else "it died"),
        Verdict("no query lost", lost == 0, f"{lost} lost or interrupted"),
    ]
    warm = [s for s in run.samples if s.at >= run.warmup] or list(run.samples)
    if len(warm) < 2:
        return [*found, Verdict("RSS and FDs flat", False, "fewer than two samples")]
    base, tail = warm[0], warm[-3:]
    rss_limit = base.rss_bytes + max(RSS_SLACK_BYTES, int(base.rss_bytes * RSS_SLACK_SHARE))
    rss_end = max(s.rss_bytes for s in tail)
    found.append(
        Verdict(
            "RSS flat",
            rss_end <= rss_limit,
            f"{base.rss_bytes / MIB:.1f} MiB at {base.at:.0f} s, {rss_end / MIB:.1f} MiB at "
            f"the end (limit {rss_limit / MIB:.1f})",
        )
    )
    fd_limit = max(s.fds for s in warm[: max(1, len(warm) // 3)]) + FD_SLACK
    fd_end = max(s.fds for s in tail)
    found.append(
        Verdict(
            "open FDs flat",
            fd_end <= fd_limit,
            f"{base.fds} at {base.at:.0f} s, {fd_end} at the end (limit {fd_limit})",
        )
    )
    return found


def _versions() -> dict[str, str]:
    def first_line(argv: list[str], contains: str) -> str:
        if shutil.which(argv[0]) is None:
            return "not installed"
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        lines = (done.stdout + done.stderr).splitlines()
        return next((line.strip() for line in lines if contains in line), "?")

    return {
        "unbound": first_line(["unbound", "-V"], "Version"),
        "dnsperf": first_line(["dnsperf", "-h"], "Version"),
        "dot-proxy": first_line([sys.executable, "-m", "dot_proxy", "--version"], "dot-proxy"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "OpenSSL (python)": ssl.OPENSSL_VERSION,
        "kernel": platform.release(),
        "CPUs": str(os.cpu_count()),
    }


def _load_table(loads: Sequence[LoadResult]) -> str:
    lines = [
        "| dnsperf | sent | answered | NOERROR | NXDOMAIN | SERVFAIL | other | lost "
        "| interrupted | avg q/s | avg latency ms | max latency ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in loads:
        r = load.result
        named = r.rcodes.get("NOERROR", 0) + r.rcodes.get("NXDOMAIN", 0) + load.servfail
        lines.append(
            f"| {r.mode} | {r.queries_sent:,} | {r.queries_completed:,} | "
            f"{r.rcodes.get('NOERROR', 0):,} | {r.rcodes.get('NXDOMAIN', 0):,} | "
            f"{load.servfail:,} | {r.queries_completed - named:,} | {r.queries_lost:,} | "
            f"{r.queries_interrupted:,} | {r.qps:,.0f} | {r.latency_avg * 1e3:.2f} | "
            f"{r.latency_max * 1e3:.0f} |"
        )
    return "\n".join(lines)


def _samples_table(samples: Sequence[Sample]) -> str:
    lines = [
        "| t (s) | RSS MiB | open FDs | CPU s | queries | SERVFAIL | upstreams up |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.at:.0f} | {s.rss_bytes / MIB:.1f} | {s.fds} | {s.cpu_seconds:.1f} | "
        f"{s.queries:,} | {s.servfail:,} | {s.upstreams_up} |"
        for s in samples
    ]
    return "\n".join(lines)


def _final_table(metrics: Mapping[str, float]) -> str:
    """The proxy's own counters at the end (dot_proxy_* series, buckets left out)."""
    rows = [
        (series, value)
        for series, value in sorted(metrics.items())
        if series.startswith("dot_proxy_") and "_bucket{" not in series and value
    ]
    if not rows:
        return "(the proxy was not there to scrape at the end)"
    lines = ["| series | value |", "|---|---|"]
    lines += [f"| `{series}` | {value:,.6g} |" for series, value in rows]
    return "\n".join(lines)


def _kills_table(kills: Sequence[Kill]) -> str:
    lines = ["| t (s) | upstream | how | down for (s) |", "|---|---|---|---|"]
    lines += [f"| {k.at:.0f} | {k.upstream} | {k.how} | {k.down_for:.1f} |" for k in kills]
    return "\n".join(lines)


def render_markdown(run: SoakRun, *, chart: str | None) -> str:
    """The report: verdicts, tables, side traffic, versions and exact commands."""
    checks = "\n".join(
        f"- {'PASS' if v.passed else 'FAIL'}: {v.name}" + (f" ({v.detail})" if v.detail else "")
        for v in verdicts(run)
    )
    versions = "\n".join(f"- {name}: `{value}`" for name, value in _versions().items())
    commands = "\n".join(f"- {name}: `{command}`" for name, command in run.servers)
    dnsperf = "\n".join(load.result.command for load in run.loads)
    image = "" if chart is None else f"\n![throughput, RSS and open FDs over time]({chart})\n"
    garbage = run.garbage
    return f"""# Soak

Generated by `{run.command_line}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.
All on loopback: dot-proxy forwards to two unbound upstreams over DoT (trustme certificate for
`dns.test`), while one UDP and one TCP dnsperf load it at a fixed rate for {run.minutes:g}
minutes. Every {run.kill_every:g} s one unbound is taken down, alternating the upstream and the
way (SIGKILL; SIGSTOP, then SIGKILL), and restarted on the same ports. Beside the load, a
garbage sender and a slowloris client. dnsperf's timeout (`-t`) is above the proxy's 5 s
deadline, so a lost query is one the proxy lost.

{checks}

## Queries

{_load_table(run.loads)}

"answered" is what dnsperf counts as completed; "lost" is what got no answer within its
timeout. The proxy logged {run.proxy_down_events} upstream-down and {run.proxy_back_events}
upstream-back events.
{image}
## Faults

{_kills_table(run.kills)}

## The proxy over time, from its own /metrics

{_samples_table(run.samples)}

RSS and FDs (`process_resident_memory_bytes`, `process_open_fds`, summed over workers) are
judged from the first sample after {run.warmup:g} s of warm-up.

## The proxy's counters at the end (its /metrics, non-zero series)

{_final_table(run.final_metrics)}

## Side traffic

- garbage: {garbage.datagrams:,} random datagrams ({garbage.replies:,} answered, the rest
  dropped) and {garbage.junk_connections:,} TCP connections sending junk;
- slowloris: {run.slowloris_connections} connections held with half a frame each:
  {run.slowloris.summary()}.

## Versions

{versions}

## Commands

Servers:

{commands}

dnsperf (both at once):

```
{dnsperf}
```
"""


def write_chart(run: SoakRun, path: Path) -> None:
    """Throughput, RSS and open FDs against time, with the faults marked."""
    import matplotlib  # noqa: PLC0415 (optional: only needed for the chart)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (rate, rss, fds) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for load in run.loads:
        times = [t for t, _ in load.intervals]
        rate.plot(times, [q for _, q in load.intervals], marker=".", label=load.result.mode)
    rate.set_ylabel("answers/s")
    rate.set_title("dnsperf throughput (per interval)")
    rate.legend(loc="lower right")
    times = [s.at for s in run.samples]
    rss.plot(times, [s.rss_bytes / MIB for s in run.samples], marker=".", color="tab:green")
    rss.set_ylabel("RSS MiB")
    fds.plot(times, [s.fds for s in run.samples], marker=".", color="tab:purple")
    fds.set_ylabel("open FDs")
    fds.set_xlabel("seconds since the load started")
    for axes in (rate, rss, fds):
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
        for kill in run.kills:
            colour = "tab:red" if kill.how == "SIGKILL" else "tab:orange"
            axes.axvline(kill.at, color=colour, alpha=0.5, linestyle="--")
    rate.text(
        0.01,
        0.05,
        "dashed: upstream killed (red) / frozen then killed (orange)",
        transform=rate.transAxes,
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
