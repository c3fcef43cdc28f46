"""``--workers auto``: the cores this process may use, within its CPU set and CPU quota."""

from __future__ import annotations

import os

import pytest

from dot_proxy.cpus import cgroup_quota_files, quota_cores, usable_cores, workers_for


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [
        ("max 100000\n", None),  # cgroup v2 without a limit
        ("200000 100000\n", 2.0),  # Kubernetes: limits.cpu: 2
        ("150000 100000", 1.5),
        ("50000 100000", 0.5),  # limits.cpu: 500m
        ("", None),
        ("garbage", None),
        ("100000 0", None),
    ],
)
def test_cgroup_v2_cpu_max(cpu_max: str, cores: float | None) -> None:
    assert quota_cores(cpu_max) == cores


@pytest.mark.parametrize(
    ("quota", "period", "cores"),
    [("-1\n", "100000\n", None), ("300000\n", "100000\n", 3.0), ("25000", "100000", 0.25)],
)
def test_cgroup_v1_cfs_quota(quota: str, period: str, cores: float | None) -> None:
    assert quota_cores(quota=quota, period=period) == cores


@pytest.mark.parametrize(
    ("cpu_set", "quota", "workers"),
    [
        (8, None, 8),
        (64, 2.0, 2),  # a 64-core node, a pod limited to 2 cores
        (64, 1.5, 1),  # rounded down: a second worker would only be throttled
        (64, 0.5, 1),  # never fewer than one
        (2, 4.0, 2),  # never more than the cores it may run on
    ],
)
def test_workers_for_cpu_set_and_quota(cpu_set: int, quota: float | None, workers: int) -> None:
    assert workers_for(cpu_set, quota) == workers


def test_quota_files_of_a_cgroup_v2_process_and_its_parents() -> None:
    files = cgroup_quota_files("0::/system.slice/dot-proxy.service\n", root="/cg")
    assert files == [
        ("/cg/system.slice/dot-proxy.service/cpu.max",),
        ("/cg/system.slice/cpu.max",),
        ("/cg/cpu.max",),
    ]
    # In a container's own cgroup namespace the process sits at the root.
    assert cgroup_quota_files("0::/\n", root="/cg") == [("/cg/cpu.max",)]


def test_quota_files_of_a_cgroup_v1_process() -> None:
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_quota_files(text, root="/cg") == [
        (
            "/cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
            "/cg/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
        ),
        ("/cg/cpu,cpuacct/docker/cpu.cfs_quota_us", "/cg/cpu,cpuacct/docker/cpu.cfs_period_us"),
        ("/cg/cpu,cpuacct/cpu.cfs_quota_us", "/cg/cpu,cpuacct/cpu.cfs_period_us"),
    ]


def test_usable_cores_takes_the_tightest_quota_on_the_way_up() -> None:
    files = {
        "/proc/self/cgroup": "0::/kubepods/pod1/container\n",
        "/sys/fs/cgroup/kubepods/pod1/container/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max": "100000 100000\n",  # the pod's limit: 1 core
        "/sys/fs/cgroup/kubepods/cpu.max": "800000 100000\n",
    }
    assert usable_cores(files.get) == 1


def test_usable_cores_without_cgroup_files_is_the_cpu_set() -> None:
    assert usable_cores(lambda path: None) == len(os.sched_getaffinity(0))
