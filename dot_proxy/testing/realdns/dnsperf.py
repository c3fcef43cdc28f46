"""dnsperf: run it once against a server and parse its summary (and, with ``-v``, the
latency of every answer, for percentiles).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from dot_proxy.testing.realdns.tools import LOOPBACK, RealDnsError, _require_tool

DnsperfMode = Literal["udp", "tcp", "dot"]


@dataclass(frozen=True, slots=True)
class DnsperfResult:
    """dnsperf's summary. Latencies are in seconds.

    ``p50``/``p99`` exist only for runs with ``percentiles=True``: dnsperf 2.10 prints no
    percentiles, so those runs add ``-v`` (one line per answer with its latency) and the
    percentiles are computed here (nearest rank) from those lines. Keep such runs at a low
    rate: writing a line per answer costs dnsperf time.
    """

    command: str
    mode: str
    clients: int
    queries_sent: int
    queries_completed: int
    queries_lost: int
    queries_interrupted: int
    rcodes: Mapping[str, int]
    run_time: float
    qps: float
    latency_avg: float
    latency_min: float
    latency_max: float
    latency_stddev: float
    p50: float | None = None
    p99: float | None = None
    latencies: tuple[float, ...] = field(default=(), repr=False)
    output: str = field(default="", repr=False)


def run_dnsperf(
    server_port: int,
    queries_file: Path | str,
    *,
    mode: DnsperfMode = "udp",
    clients: int = 20,
    seconds: float = 10,
    max_qps: int | None = None,
    timeout: float = 5,
    extra: Sequence[str] = (),
    server: str = LOOPBACK,
    percentiles: bool = False,
) -> DnsperfResult:
    """Run dnsperf once against ``server:server_port`` and parse its summary.

    ``mode="dot"`` does not verify the certificate (dnsperf cannot); fine for the limit row.
    Error handling: a non-zero exit or a summary that does not parse raises ``RealDnsError``
    with dnsperf's output.
    """
    argv = [
        _require_tool("dnsperf"),
        *("-s", server, "-p", str(server_port), "-d", str(queries_file), "-m", mode),
        *("-c", str(clients), "-l", _num(seconds), "-t", _num(timeout)),
    ]
    if max_qps is not None:
        argv += ["-Q", str(max_qps)]
    if percentiles:
        argv.append("-v")
    argv += extra
    completed = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=seconds + timeout + 30
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RealDnsError(f"{shlex.join(argv)} exited {completed.returncode}:\n{output}")
    return parse_dnsperf(completed.stdout, command=shlex.join(argv), mode=mode, clients=clients)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_FIELD = re.compile(r"^\s*([A-Za-z ()]+?):\s+(.*)$")
_PER_QUERY = re.compile(r"^> (\S+) .* (\d+\.\d+)$")


def parse_dnsperf(stdout: str, *, command: str, mode: str, clients: int) -> DnsperfResult:
    """Parse dnsperf 2.x output (the part before "Connection Statistics")."""
    summary, _, _ = stdout.partition("Connection Statistics")
    fields: dict[str, str] = {}
    for line in summary.splitlines():
        match = _FIELD.match(line)
        if match and match.group(1) not in fields:
            fields[match.group(1)] = match.group(2)
    try:
        latency = re.findall(r"[\d.]+", fields["Average Latency (s)"])
        result = DnsperfResult(
            command=command,
            mode=mode,
            clients=clients,
            queries_sent=_first_int(fields["Queries sent"]),
            queries_completed=_first_int(fields["Queries completed"]),
            queries_lost=_first_int(fields["Queries lost"]),
            queries_interrupted=_first_int(fields.get("Queries interrupted", "0")),
            rcodes=MappingProxyType(_parse_rcodes(fields.get("Response codes", ""))),
            run_time=float(fields["Run time (s)"]),
            qps=float(fields["Queries per second"]),
            latency_avg=float(latency[0]),
            latency_min=float(latency[1]),
            latency_max=float(latency[2]),
            latency_stddev=float(fields["Latency StdDev (s)"]),
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise RealDnsError(f"cannot parse dnsperf output of {command}:\n{stdout}") from exc
    latencies = tuple(
        sorted(float(m.group(2)) for m in map(_PER_QUERY.match, stdout.splitlines()) if m)
    )
    if not latencies:
        return result
    return replace(
        result,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        latencies=latencies,
        output=stdout,
    )


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil(n * pct / 100), at least 1
    return sorted_values[int(rank) - 1]


def _first_int(text: str) -> int:
    return int(text.split(maxsplit=1)[0])


def _parse_rcodes(text: str) -> dict[str, int]:
    return {name: int(count) for name, count in re.findall(r"([A-Z]+) (\d+) \(", text)}
