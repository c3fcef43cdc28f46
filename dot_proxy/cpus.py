"""How many cores this process may use, for ``--workers auto``: CPU set and CPU quota.

``os.sched_getaffinity`` gives the cores the process may run on, but a container is more often
limited by a quota than by a CPU set: Kubernetes turns a pod's CPU limit into a CFS quota
(cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) and leaves it every
core of the node. Workers beyond the quota only make the kernel throttle them all, a pause of
the whole proxy until the next period: the count is the quota, rounded down, at least one (as
Go's automaxprocs does), and never more than the CPU set.

The parsing is pure (text in, cores out); :func:`usable_cores` reads ``/proc`` and
``/sys/fs/cgroup`` at the edge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import PurePosixPath

__all__ = ["cgroup_quota_files", "quota_cores", "usable_cores", "workers_for"]

CGROUP_ROOT = "/sys/fs/cgroup"

ReadText = Callable[[str], str | None]


def quota_cores(
    cpu_max: str | None = None, *, quota: str | None = None, period: str | None = None
) -> float | None:
    """The cores a CFS quota allows, or ``None`` for no quota (or a file that says nothing).

    ``cpu_max`` is cgroup v2's ``cpu.max`` (``"200000 100000"``, or ``"max 100000"`` for no
    limit); ``quota`` and ``period`` are cgroup v1's ``cpu.cfs_quota_us`` (``-1``: no limit) and
    ``cpu.cfs_period_us``.
    """
    if cpu_max is not None:
        fields = cpu_max.split()
        if len(fields) == 2:
            quota, period = fields
    if quota is None or period is None:
        return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None  # "max", or a file this code does not understand: no limit known
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def cgroup_quota_files(proc_self_cgroup: str, root: str = CGROUP_ROOT) -> list[tuple[str, ...]]:
    """The files that may hold this process's CPU quota, its own cgroup's first.

    From ``/proc/self/cgroup``: for cgroup v2 (``0::/PATH``) ``cpu.max`` of that cgroup and of
    each parent (a quota on a parent, such as a systemd slice, limits the children too); for
    v1 (``N:cpu,cpuacct:/PATH``) the pair ``cpu.cfs_quota_us``, ``cpu.cfs_period_us`` likewise.
    Inside a container with its own cgroup namespace the path is ``/``, so only the root's
    files are named.
    """
    found: list[tuple[str, ...]] = []
    for line in proc_self_cgroup.splitlines():
        _number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if controllers == "":
            found += [(f"{directory}/cpu.max",) for directory in _up_from(f"{root}{path}", root)]
        elif "cpu" in controllers.split(","):
            base = f"{root}/{controllers}{path}"
            found += [
                (f"{directory}/cpu.cfs_quota_us", f"{directory}/cpu.cfs_period_us")
                for directory in _up_from(base, f"{root}/{controllers}")
            ]
    return found


def _up_from(directory: str, top: str) -> list[str]:
    chain = [PurePosixPath(directory)]
    while chain[-1] != PurePosixPath(top) and chain[-1] != chain[-1].parent:
        chain.append(chain[-1].parent)
    return [str(path) for path in chain]


def workers_for(cpu_set: int, quota: float | None) -> int:
    """Worker processes for ``cpu_set`` cores under ``quota`` cores (``None``: no quota)."""
    if quota is None:
        return max(1, cpu_set)
    return max(1, min(cpu_set, math.floor(quota)))


def usable_cores(read_text: ReadText | None = None) -> int:
    """The cores this process may use: its CPU set, bounded by the tightest CPU quota."""
    read = read_text if read_text is not None else _read_text
    quotas: list[float] = []
    for files in cgroup_quota_files(read("/proc/self/cgroup") or ""):
        texts = [read(path) for path in files]
        if any(text is None for text in texts):
            continue
        if len(files) == 1:
            cores = quota_cores(texts[0])
        else:
            cores = quota_cores(quota=texts[0], period=texts[1])
        if cores is not None:
            quotas.append(cores)
    return workers_for(len(os.sched_getaffinity(0)), min(quotas, default=None))


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as file:
            return file.read()
    except (OSError, UnicodeDecodeError):
        return None
