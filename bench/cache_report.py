"""The benchmark report's cache section: the cache-hit rows, and issue 13's targets as ratios
measured in the same run, each with the commands that produced its figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from report import MIB, Fill, Measurements, Row, find_row, render_table

# Issue 13's targets.
HIT_OVER_FORWARDING = 2.0  # cache-hit queries/s over dot-proxy's own forwarding queries/s
HIT_OVER_BARE_LOOP = 0.70  # cache-hit queries/s over the bare trio loop's (UDP)
RSS_LIMIT = 64 * MIB  # with the default cache full
PEERS = ("dnsdist-cache", "unbound-cache")
TRANSPORTS = ("udp", "tcp")


@dataclass(frozen=True, slots=True)
class Check:
    """One target: what was compared, the figures, the goal and whether it was met.

    ``met`` is None where there is no goal (a ratio reported as it is) or nothing to compare.
    """

    what: str
    measured: str
    goal: str
    met: bool | None
    commands: tuple[str, ...]


def load_command(measured: Measurements, target: str, transport: str) -> str:
    """The max-load dnsperf command of ``target`` over ``transport`` (the same every round)."""
    runs = (r for r in measured.loads if (r.target, r.transport) == (target, transport))
    return next((f"{run.result.command}  # {target}" for run in runs), "")


def latency_command(measured: Measurements, target: str, transport: str) -> str:
    runs = (r for r in measured.latencies if (r.target, r.transport) == (target, transport))
    return next((f"{run.command}  # {target}" for run in runs), "")


def _missing(what: str, goal: str, *names: str) -> Check:
    return Check(what, f"not measured: needs {' and '.join(names)} in --systems", goal, None, ())


def throughput_check(
    measured: Measurements,
    rows: Sequence[Row],
    what: str,
    row: tuple[str, str],
    reference: tuple[str, str],
    floor: float | None,
) -> Check:
    """``row``'s queries/s over ``reference``'s, against ``floor`` (None: no goal)."""
    goal = f"≥ {floor:g}x" if floor is not None else "-"
    mine, theirs = find_row(rows, *row), find_row(rows, *reference)
    if mine is None or theirs is None:
        return _missing(what, goal, row[0], reference[0])
    value = mine.qps / theirs.qps
    return Check(
        what,
        f"{value:.2f}x ({mine.qps:,.0f} against {theirs.qps:,.0f} q/s; CPU "
        f"{mine.cpu_us:.1f} against {theirs.cpu_us:.1f} µs/query)",
        goal,
        None if floor is None else value >= floor,
        (load_command(measured, *row), load_command(measured, *reference)),
    )


def latency_check(measured: Measurements, rows: Sequence[Row], transport: str) -> Check:
    what = f"dot-proxy cache-hit p50 below stubby's forwarding p50, {transport.upper()}"
    goal = "below stubby's"
    mine = find_row(rows, "dot-proxy-cache", transport)
    theirs = find_row(rows, "stubby", transport)
    if mine is None or theirs is None:
        return _missing(what, goal, "dot-proxy-cache", "stubby")
    return Check(
        what,
        f"{mine.p50 * 1e3:.3f} ms against {theirs.p50 * 1e3:.3f} ms ({mine.p50 / theirs.p50:.2f}x)",
        goal,
        mine.p50 < theirs.p50,
        (
            latency_command(measured, "dot-proxy-cache", transport),
            latency_command(measured, "stubby", transport),
        ),
    )


def rss_check(measured: Measurements, rows: Sequence[Row]) -> Check:
    what = "dot-proxy's peak RSS with the default cache full"
    goal = f"< {RSS_LIMIT / MIB:.0f} MiB"
    row = find_row(rows, "dot-proxy-cache", "udp")
    fill = _fill(measured, "dot-proxy-cache")
    if row is None or fill is None:
        return _missing(what, goal, "dot-proxy-cache")
    server = next(t.command for t in measured.targets if t.name == "dot-proxy-cache")
    return Check(
        what,
        f"{row.peak_rss / MIB:.1f} MiB (VmHWM at the end; {fill.rss / MIB:.1f} MiB right after "
        f"{fill.answered:,} distinct names were answered, more than it keeps)",
        goal,
        row.peak_rss < RSS_LIMIT,
        (f"{server}  # dot-proxy-cache", f"{fill.command}  # fill"),
    )


def _fill(measured: Measurements, target: str) -> Fill | None:
    return next((fill for fill in measured.fills if fill.target == target), None)


def cache_checks(measured: Measurements, rows: Sequence[Row]) -> list[Check]:
    """Issue 13's targets, in order, then the ratios to the peers' caches."""
    checks = [
        throughput_check(
            measured,
            rows,
            f"dot-proxy cache-hit q/s over its own forwarding q/s, {transport.upper()}",
            ("dot-proxy-cache", transport),
            ("dot-proxy", transport),
            HIT_OVER_FORWARDING,
        )
        for transport in TRANSPORTS
    ]
    checks.append(
        throughput_check(
            measured,
            rows,
            "dot-proxy cache-hit q/s over the bare trio loop's, UDP",
            ("dot-proxy-cache", "udp"),
            ("bare-loop", "udp"),
            HIT_OVER_BARE_LOOP,
        )
    )
    checks += [latency_check(measured, rows, transport) for transport in TRANSPORTS]
    checks.append(rss_check(measured, rows))
    checks += [
        throughput_check(
            measured,
            rows,
            f"dot-proxy cache-hit q/s over {peer}'s, {transport.upper()}",
            ("dot-proxy-cache", transport),
            (peer, transport),
            None,
        )
        for peer in PEERS
        for transport in TRANSPORTS
    ]
    return checks


def _met(check: Check) -> str:
    if check.met is None:
        return "-"
    return "yes" if check.met else "**not met**"


def render_checks(checks: Sequence[Check]) -> str:
    lines = ["| # | target | measured in this run | goal | met |", "|---|---|---|---|---|"]
    for number, check in enumerate(checks, 1):
        lines.append(
            f"| {number} | {check.what} | {check.measured} | {check.goal} | {_met(check)} |"
        )
    commands = [
        f"{number}. " + "; ".join(f"`{command}`" for command in check.commands if command)
        for number, check in enumerate(checks, 1)
        if any(check.commands)
    ]
    return "\n".join(lines) + "\n\nThe commands behind each figure:\n\n" + "\n".join(commands)


def _after_fill(measured: Measurements) -> dict[str, Fill]:
    return {fill.target: fill for fill in measured.fills}


def render_cache_section(rows: Sequence[Row], measured: Measurements) -> str:
    """The section, or "" when no cache row was measured."""
    m = measured
    cached = [row for row in rows if row.kind != "forwarding"]
    if not cached:
        return ""
    fills = _after_fill(measured)

    def rss_after_fill(row: Row) -> str:
        fill = fills.get(row.target)
        return "-" if fill is None else f"{fill.rss / MIB:.1f}"

    def upstream(row: Row) -> str:
        return "-" if row.upstream_queries is None else f"{row.upstream_queries:,}"

    table = render_table(
        cached,
        references=("dot-proxy", *PEERS, "bare-loop"),
        all_rows=rows,
        extra=(("RSS MiB after fill", rss_after_fill), ("upstream queries", upstream)),
    )
    fill_lines = "\n".join(
        f"- {fill.target}: {fill.sent:,} names sent, {fill.answered:,} answered NOERROR, "
        f"{fill.upstream_queries:,} upstream queries (fill and hit names), RSS after "
        f"{fill.rss / MIB:.1f} MiB: `{fill.command}`, then "
        + ", ".join(f"`{command}`" for command in fill.warm_commands)
        for fill in measured.fills
    )
    return f"""
## Cache hits

dnsperf over `hits.txt`, {m.hit_count} names of the zone that every system has answered
before: the same rounds, clients, durations and low-rate runs as the forwarding rows above.
Before the rounds, each caching system was filled with every name of the zone that has data
(`fill.txt`, {m.fill_count:,} names, once each over UDP: `dnsperf -n 1`; more than dot-proxy's
default 10,000 entries, so its cache is full), then asked each hit name once on each transport.
stubby has no cache and is not in these rows.

{table}

- **dot-proxy-cache**: dot-proxy with its default cache (10,000 answers); the query is answered
  where it is read, in the UDP serve loop or on the TCP connection.
- **dnsdist-cache**: dnsdist with `newPacketCache(...)` on its default pool (its other settings
  at their defaults), sized so that every filled name fits: when full, dnsdist stores nothing
  more, and it keeps UDP and TCP answers apart.
- **unbound-cache**: a second unbound (one thread, message and RRset caches at their default
  4 MB each) that forwards `test.` over DoT to the first one (`forward-tls-upstream: yes`,
  certificate checked against the trustme CA) and answers repeated names from its cache.
- **bare-loop**: `bench/investigations/trio_floor.py`'s bare shape, with the proxy's burst: a
  trio loop that reads a burst of datagrams and answers each in place by flipping it into an
  NXDOMAIN, no look-up, no DNS work; UDP only. The ceiling of a hit answered in the serve loop.
- Near 200,000 queries/s dnsperf itself needs most of the other core of a 2-core machine, so
  the fastest rows may show the client's limit as much as the server's: **CPU µs/query**, the
  server's own time per answer, is the steadier comparison there (the targets quote both).
- **RSS MiB after fill**: `VmRSS` right after the fill and the hit names; **upstream queries**:
  what the upstream unbound counted (`unbound-control stats_noreset`, `total.num.queries`)
  during the max-load runs, summed over the rounds: near 0 when every answer came from the
  cache. The dnsdist processes' health checks (one query a second each, to `h0.test.`) count
  in every row.
- **x dot-proxy**: throughput over dot-proxy's forwarding row (cache off) on the same
  transport; **x dnsdist-cache / x unbound-cache / x bare-loop**: over that row.

Filling (each system's fill, then its hit names once per transport):

{fill_lines}

### Issue 13's targets, in this run

{render_checks(cache_checks(measured, rows))}
"""
