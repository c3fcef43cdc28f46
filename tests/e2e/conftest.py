"""Fixtures that run real DNS software (see ``dot_proxy/testing/realdns.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator, Sequence

import pytest

from dot_proxy.testing import realdns


def _skip_or_fail(message: str) -> None:
    # On CI every tool must be there: a missing one is a failure, never a silent skip.
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _require_tools(*names: str) -> None:
    """Skip the test when a program is missing; fail instead on CI, where it must be there."""
    missing = realdns.missing_tools(*names)
    if missing:
        _skip_or_fail(f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """A fixture that starts a missing program skips the test (fails it on CI)."""
    try:
        return (yield)
    except realdns.ToolMissingError as exc:
        _skip_or_fail(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """So does a test that starts one itself (``realdns.Unbound(...)``) without asking first."""
    try:
        return (yield)
    except realdns.ToolMissingError as exc:
        _skip_or_fail(str(exc))


@pytest.fixture
def require_tools() -> Callable[..., None]:
    """``require_tools("stubby", ...)``: skip (or on CI fail) unless those programs exist."""
    return _require_tools


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> realdns.Pki:
    """A trustme CA and a certificate for dns.test, 127.0.0.1 and ::1."""
    return realdns.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def unbound(
    pki: realdns.Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[realdns.Unbound]:
    """unbound serving the test zone over DoT (``tls_port``) and plain DNS (``plain_port``).

    Session-scoped: a test that stops or kills it (``unbound.process``) must use its own.
    """
    _require_tools("unbound")
    with realdns.Unbound(pki, workdir=tmp_path_factory.mktemp("unbound")) as server:
        yield server


@pytest.fixture
def start_dot_proxy(
    pki: realdns.Pki, unbound: realdns.Unbound, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., realdns.DotProxy]]:
    """A factory: ``start_dot_proxy(*extra_args, upstreams=None)`` -> a running DotProxy.

    It forwards to the session's unbound unless ``upstreams`` says otherwise; every proxy
    started is stopped at the end of the test.
    """
    started: list[realdns.DotProxy] = []

    def start(*extra_args: str, upstreams: Sequence[str] | None = None) -> realdns.DotProxy:
        proxy = realdns.DotProxy(
            pki,
            upstreams if upstreams is not None else [unbound.upstream_spec],
            extra_args=extra_args,
            workdir=tmp_path_factory.mktemp("dot-proxy"),
        )
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.cleanup()
