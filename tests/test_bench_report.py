"""The benchmark report's cache section, from made-up measurements: which target is met, which
is not, which could not be measured, and that no path of the machine leaks into the report."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from dot_proxy.testing import realdns

BENCH = Path(__file__).resolve().parents[1] / "bench"
MIB = 1024 * 1024


def _bench(name: str) -> ModuleType:
    # bench/ is a folder of scripts that import each other by their own names.
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    return importlib.import_module(name)


report = _bench("report")
cache_report = _bench("cache_report")

# (system, kind, transport) -> (queries/s, p50 s, peak RSS)
FIGURES = {
    ("dot-proxy", "forwarding", "udp"): (20_000, 0.0004, 30 * MIB),
    ("dot-proxy", "forwarding", "tcp"): (18_000, 0.0004, 30 * MIB),
    ("stubby", "forwarding", "udp"): (17_000, 0.0003, 10 * MIB),
    ("stubby", "forwarding", "tcp"): (16_000, 0.0003, 10 * MIB),
    ("dot-proxy-cache", "cache", "udp"): (120_000, 0.0001, 40 * MIB),
    ("dot-proxy-cache", "cache", "tcp"): (30_000, 0.0005, 40 * MIB),
    ("dnsdist-cache", "cache", "udp"): (200_000, 0.0001, 29 * MIB),
    ("dnsdist-cache", "cache", "tcp"): (120_000, 0.0001, 29 * MIB),
    ("bare-loop", "floor", "udp"): (190_000, 0.0001, 39 * MIB),
}
WORKDIR = "/tmp/dot-proxy-bench-xyz"


def measurements(figures: dict[tuple[str, str, str], tuple[float, float, int]]) -> Any:
    targets, loads, latencies = {}, [], []
    for (name, kind, transport), (qps, p50, _) in figures.items():
        transports = tuple(t for (n, _, t) in figures if n == name)
        targets[name] = report.Target(
            name, 1, transports, 1, f"{sys.executable} -m x --dir {WORKDIR}/a", kind=kind
        )
        result = realdns.DnsperfResult(
            command=f"dnsperf -d {WORKDIR}/{'hits' if kind != 'forwarding' else 'queries'}.txt",
            mode=transport,
            clients=20,
            queries_sent=int(qps),
            queries_completed=int(qps),
            queries_lost=0,
            queries_interrupted=0,
            rcodes={"NOERROR": int(qps)},
            run_time=1.0,
            qps=qps,
            latency_avg=p50,
            latency_min=p50,
            latency_max=p50,
            latency_stddev=0.0,
        )
        upstream = 0 if kind == "cache" else None
        loads.append(report.LoadRun(name, transport, 1, result, 5.0, 30 * MIB, upstream))
        latencies.append(report.LatencyRun(name, transport, 1, (p50,), 0, "dnsperf -Q 200"))
    peaks: dict[str, int] = {}
    for (name, _, _), (_, _, rss) in figures.items():
        peaks[name] = max(rss, peaks.get(name, 0))
    fill = report.Fill("dot-proxy-cache", "dnsperf -n 1", 10_500, 10_500, (), 10_500, 38 * MIB)
    return report.Measurements(
        targets=tuple(targets.values()),
        loads=tuple(loads),
        latencies=tuple(latencies),
        configs=(),
        peak_rss=peaks,
        query_count=20_000,
        loadavg_before=0.1,
        loadavg_after=0.2,
        command_line="python bench/run_bench.py",
        rounds=1,
        clients=20,
        seconds=1,
        latency_qps=200,
        latency_seconds=1,
        fills=(fill,) if "dot-proxy-cache" in peaks else (),
        hit_count=100,
        fill_count=10_500,
        zone="5,000 hosts",
        workdir=WORKDIR,
    )


def checks(figures: dict[tuple[str, str, str], tuple[float, float, int]]) -> dict[str, Any]:
    measured = measurements(figures)
    return {c.what: c for c in cache_report.cache_checks(measured, report.summarize(measured))}


def test_each_target_is_judged_from_its_ratio() -> None:
    found = checks(FIGURES)

    assert found["dot-proxy cache-hit q/s over its own forwarding q/s, UDP"].met is True
    assert found["dot-proxy cache-hit q/s over its own forwarding q/s, TCP"].met is False
    assert found["dot-proxy cache-hit q/s over the bare trio loop's, UDP"].met is False
    assert found["dot-proxy cache-hit p50 below stubby's forwarding p50, UDP"].met is True
    assert found["dot-proxy cache-hit p50 below stubby's forwarding p50, TCP"].met is False
    assert found["dot-proxy's peak RSS with the default cache full"].met is True
    assert found["dot-proxy cache-hit q/s over dnsdist-cache's, UDP"].met is None
    assert found["dot-proxy cache-hit q/s over dnsdist-cache's, UDP"].measured.startswith("0.60x")


def test_a_target_whose_rows_were_not_run_says_so() -> None:
    found = checks({k: v for k, v in FIGURES.items() if k[0] != "bare-loop"})
    check = found["dot-proxy cache-hit q/s over the bare trio loop's, UDP"]

    assert check.met is None
    assert check.measured == "not measured: needs dot-proxy-cache and bare-loop in --systems"
    assert found["dot-proxy cache-hit q/s over unbound-cache's, TCP"].met is None


def test_rss_over_the_limit_is_not_met() -> None:
    figures = dict(FIGURES)
    figures[("dot-proxy-cache", "cache", "udp")] = (120_000, 0.0001, 70 * MIB)

    assert checks(figures)["dot-proxy's peak RSS with the default cache full"].met is False


def test_the_report_marks_misses_and_names_no_machine_path() -> None:
    measured = measurements(FIGURES)
    rows = report.summarize(measured)
    section = cache_report.render_cache_section(rows, measured)
    text = report.public(section, measured)

    assert "| 2 | dot-proxy cache-hit q/s over its own forwarding q/s, TCP |" in text
    assert text.count("**not met**") == 3
    assert "$WORKDIR/hits.txt" in text
    assert WORKDIR not in text
    assert sys.executable not in report.public(measured.targets[0].command, measured)


def test_no_cache_section_without_cache_rows() -> None:
    forwarding = {k: v for k, v in FIGURES.items() if k[1] == "forwarding"}
    measured = measurements(forwarding)

    assert cache_report.render_cache_section(report.summarize(measured), measured) == ""
