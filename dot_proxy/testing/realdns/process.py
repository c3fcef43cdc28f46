"""What a process costs, read from ``/proc``: CPU time and memory of a process and its live
children (``dot-proxy --workers`` forks), sampled before and after a benchmark run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from dot_proxy.testing.realdns.tools import RealDnsError


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU time (user + system, all threads, seconds) and memory of a process at one moment."""

    cpu_seconds: float
    rss_bytes: int
    peak_rss_bytes: int


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``dot-proxy --workers`` forks its workers)."""
    tree = [pid]
    for member in tree:
        for children in Path(f"/proc/{member}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                tree.extend(int(child) for child in children.read_text().split())
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread) and its live children."""
    return sum(_own_cpu_seconds(member) for member in process_tree(pid))


def _own_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RealDnsError(f"no {key} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    """Resident set size now (``VmRSS``), summed over the process and its live children."""
    return sum(_status_kib(member, "VmRSS") for member in process_tree(pid)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """Highest resident set size since start (``VmHWM``), summed over the process tree."""
    return sum(_status_kib(member, "VmHWM") for member in process_tree(pid)) * 1024


def sample_process(pid: int) -> ProcSample:
    return ProcSample(cpu_seconds(pid), rss_bytes(pid), peak_rss_bytes(pid))


def cpu_us_per_query(before: ProcSample, after: ProcSample, answered: int) -> float:
    """CPU microseconds the process spent per answered query between two samples."""
    if answered <= 0:
        return float("nan")
    return (after.cpu_seconds - before.cpu_seconds) / answered * 1e6
