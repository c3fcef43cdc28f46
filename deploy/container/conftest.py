"""Fixtures of ``nox -s container``: the image built once per run, unbound as its upstream."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dot_proxy
from dot_proxy.testing import container, realdns

ROOT = Path(__file__).resolve().parent.parent.parent
TAG = "localhost/dot-proxy:test"
TOOLS = ("podman", "runc", "debootstrap", "kdig", "dig", "unbound")


@dataclass(slots=True)
class Built:
    """The image under test and what it took to make it."""

    podman: container.Podman
    tag: str
    base: str
    base_seconds: float | None
    build_seconds: float
    report: list[str] = field(default_factory=list)


_REPORT: list[str] = []


def _require() -> None:
    missing = realdns.missing_tools(*TOOLS)
    problem = f"not installed: {', '.join(missing)}" if missing else None
    if problem is None and os.geteuid() != 0:
        problem = "needs root (rootful podman, debootstrap)"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The image, built from the Dockerfile (cached layers make a second run take seconds)."""
    _require()
    workdir = tmp_path_factory.mktemp("container")
    podman = container.Podman.configured(workdir)
    base, base_seconds = container.base_image(podman, ROOT / "Dockerfile", workdir)
    config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    seconds = container.build_image(
        podman,
        tag=TAG,
        base=base,
        context=ROOT,
        pip_volumes=container.pip_settings(workdir, config),
        build_args=["--build-arg", f"VERSION={dot_proxy.__version__}"],
    )
    made = f"made with debootstrap in {base_seconds:.0f} s" if base_seconds else "present"
    _REPORT.append(f"base image: {base} ({made}, {podman.size(base) / 1e6:.1f} MB)")
    _REPORT.append(f"image {TAG}: built in {seconds:.1f} s, {podman.size(TAG) / 1e6:.1f} MB")
    yield Built(podman, TAG, base, base_seconds, seconds, _REPORT)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> realdns.Pki:
    return realdns.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def unbound(
    pki: realdns.Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[realdns.Unbound]:
    """The end-to-end tests' unbound, serving DoT on loopback."""
    _require()
    with realdns.Unbound(pki, workdir=tmp_path_factory.mktemp("unbound")) as server:
        yield server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT:
        terminalreporter.section("container image")
        for line in _REPORT:
            terminalreporter.write_line(line)
