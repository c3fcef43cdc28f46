"""Sessions: ``nox`` runs the default ones (tests, lint); ``nox -l`` lists them all."""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite: pure, in-process and end to end (unbound, kdig, dig).

    End-to-end tests skip when a tool is missing, except under CI=true, where they fail.
    Arguments after -- go to pytest, e.g. `nox -s tests -- -k truncat`.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy --strict on the package."""
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "dot_proxy")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Throughput and latency against stubby, dnsdist and unbound with dnsperf (minutes).

    Installs the Debian tools when run as root. Writes docs/benchmarks.md and a chart.
    Arguments after -- go to bench/run_bench.py, e.g. `nox -s bench -- --seconds 5`.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "bench"))
    session.run("python", "bench/run_bench.py", *session.posargs)


@nox.session(default=False)
def ab(session: nox.Session) -> None:
    """This checkout's dot-proxy against another revision's, side by side, in one run.

    Arguments after -- go to bench/ab.py, e.g. `nox -s ab -- --base HEAD~1 --seconds 5`.
    Needs unbound and dnsperf.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "bench"))
    session.run("python", "bench/ab.py", *session.posargs)


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """Coverage-guided fuzzing of the whole query path with atheris (60 s by default).

    Seeds from fuzz/corpus and fuzz/regressions; grows fuzz/work; crashes land in
    fuzz/crashes. Prints executions, exec/s and coverage (cov: edges of dot_proxy reached).
    Arguments after -- go to fuzz/run.py, e.g. `nox -s fuzz -- --seconds 600 --fresh`.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "fuzz"))
    session.run("python", "fuzz/run.py", *session.posargs)


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """Ten minutes of dnsperf UDP+TCP load while an upstream unbound dies every 30 s.

    Installs unbound and dnsperf when run as root. Writes docs/soak.md and docs/soak.png;
    fails unless no query was lost and the proxy's RSS and open FDs stayed flat.
    Arguments after -- go to soak/run_soak.py, e.g. `nox -s soak -- --minutes 1 --kill-every 15`.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "soak"))
    session.run("python", "soak/run_soak.py", *session.posargs)


@nox.session(default=False)
def container(session: nox.Session) -> None:
    """Build the image from the Dockerfile with podman, run it and query it (deploy/container).

    Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap), and
    unbound, kdig and dig: skipped without them, failed under CI=true. Where no image
    registry is in reach the base is a Debian made with debootstrap (~1 min, once; kept with
    every cached layer, so a second run takes seconds); DOT_PROXY_BASE_IMAGE picks another.
    Reports the image's size and what dot-proxy adds. Arguments after -- go to pytest.
    """
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "deploy/container", *session.posargs)
