"""Fixtures shared by the in-process tests: a trustme CA, fake upstreams, a proxy on port 0,
virtual time (``clock``) and a guard against a test that would hang (``hang_guard``).

Both of the last two are opt-in, by naming them as a test's argument. pytest-trio runs a test
on a ``trio.abc.Clock`` only when one is among the test's own arguments (a clock that is merely
a fixture's dependency, or in ``usefixtures``, is not used), so a test that does not name
``clock`` runs on real time, as subprocess and end-to-end tests must: a MockClock cannot time
a process it does not schedule. tests/test_fixtures.py checks that this still holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from dot_proxy.config import Config, parse_upstream
from dot_proxy.handler import ServerStats
from dot_proxy.resolver import Resolver, open_resolver
from dot_proxy.serve.ops import endpoints_for
from dot_proxy.serve.ops_http import bind_ops_socket, serve_ops
from dot_proxy.serve.running import Running, open_running
from dot_proxy.serve.server import serve
from dot_proxy.upstream.group import UpstreamGroup
from tests.fakes import (
    Behaviour,
    FakePlainServer,
    FakeUpstream,
    TcpBehaviour,
    UdpBehaviour,
    answer_all,
    answer_tcp,
    answer_udp,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for tests over loopback sockets: take ``clock: trio.testing.MockClock``.

    Like pytest-trio's ``autojump_clock``, but the clock jumps to the next deadline only after
    every task has been blocked for 10 ms of real time, not at once: on a busy machine bytes
    written to loopback can take a moment to become readable, and a clock that jumps in that
    moment would fire timeouts no real upstream caused. Virtual time still never moves while a
    task runs, so timings measured with ``trio.current_time()`` stay exact.
    """
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
async def hang_guard(nursery: trio.Nursery) -> None:
    """Fail a test that would wait forever (for a reply that never comes) instead of hanging
    the run: after 60 s of real time, or 1,000 s of virtual time under a MockClock (which
    jumps there at once when nothing else is due). A test takes it as an argument,
    ``hang_guard: None`` (pytest-trio runs only the trio fixtures that are the test's
    arguments or their dependencies, not ``usefixtures`` ones)."""
    virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
    limit = 1000.0 if virtual else 60.0

    async def guard() -> None:
        await trio.sleep(limit)
        raise AssertionError(f"the test was still waiting after {limit:g} s: it hung")

    nursery.start_soon(guard)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@dataclass
class RunningProxy:
    """A proxy serving UDP and TCP on 127.0.0.1:port in the test's nursery; ``resolver`` is
    what it asks (the cache, and the upstream group whose health records a test looks at)."""

    port: int
    config: Config
    stats: ServerStats
    stop: trio.Event
    resolver: Resolver

    @property
    def group(self) -> UpstreamGroup:
        return self.resolver.group


StartUpstream = Callable[..., Awaitable[FakeUpstream]]
StartPlain = Callable[..., Awaitable[FakePlainServer]]
StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def start_upstream(ca: trustme.CA, nursery: trio.Nursery) -> StartUpstream:
    """``await start_upstream(behaviour, **kwargs)`` → a FakeUpstream serving on loopback."""

    async def start(
        behaviour: Behaviour = answer_all, *, ca: trustme.CA = ca, **kwargs: Any
    ) -> FakeUpstream:
        upstream = FakeUpstream(ca, behaviour=behaviour, **kwargs)
        await nursery.start(upstream.serve)
        return upstream

    return start


@pytest.fixture
def start_plain(nursery: trio.Nursery) -> StartPlain:
    """``await start_plain(udp=..., tcp=...)`` → a cleartext FakePlainServer on loopback."""

    async def start(
        udp: UdpBehaviour = answer_udp, tcp: TcpBehaviour = answer_tcp
    ) -> FakePlainServer:
        server = FakePlainServer(udp, tcp)
        await nursery.start(server.serve)
        return server

    return start


@pytest.fixture
def start_proxy(ca_file: str, nursery: trio.Nursery) -> StartProxy:
    """``await start_proxy([upstream, ...], **config_fields)`` → a RunningProxy (no cache
    unless ``cache_size`` says so).

    The fixture opens the resolver and hands it to ``serve`` (its ``resolver=`` seam), so a
    test can reach it; ``serve`` opening its own is what tests/test_server_lifecycle.py runs.
    """

    async def start(upstreams: list[FakeUpstream], **options: Any) -> RunningProxy:
        options.setdefault("ca_file", ca_file)
        # These tests count what reaches the fake upstreams: the cache stays off unless a test
        # turns it on (tests/test_cache_server.py does; the end-to-end tests run the default).
        options.setdefault("cache_size", 0)
        config = Config(
            upstreams=tuple(parse_upstream(u.spec) for u in upstreams),
            listen=("127.0.0.1",),
            port=0,
            **options,
        )
        stats = ServerStats()
        stop = trio.Event()
        opened: list[Resolver] = []

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            async with open_resolver(config) as resolver:
                opened.append(resolver)
                await serve(
                    config, stop=stop, stats=stats, resolver=resolver, task_status=task_status
                )

        bound = await nursery.start(run)
        return RunningProxy(bound[0][2], config, stats, stop, opened[0])

    return start


@dataclass
class OpsProxy:
    """A proxy serving DNS on 127.0.0.1:``port`` and its operations endpoint on ``http``,
    the way ``dot-proxy --metrics`` runs them; ``stopped`` is set once ``serve`` returned."""

    port: int
    http: int
    running: Running
    stop: trio.Event
    stopped: trio.Event


StartOpsProxy = Callable[..., Awaitable[OpsProxy]]


@pytest.fixture
def start_ops_proxy(ca_file: str, nursery: trio.Nursery) -> StartOpsProxy:
    """``await start_ops_proxy([upstream, ...], **config_fields)``, or ``config=`` a whole
    Config, → an OpsProxy (no cache unless asked, as ``start_proxy``)."""

    async def start(
        upstreams: list[FakeUpstream] | None = None, *, config: Config | None = None, **options: Any
    ) -> OpsProxy:
        if config is None:
            assert upstreams is not None
            options.setdefault("ca_file", ca_file)
            options.setdefault("cache_size", 0)
            config = Config(
                upstreams=tuple(parse_upstream(u.spec) for u in upstreams),
                listen=("127.0.0.1",),
                port=0,
                **options,
            )
        stop, stopped = trio.Event(), trio.Event()
        found: dict[str, Any] = {}

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with open_running(config) as running:
                    found["running"] = running
                    endpoints = endpoints_for(running, stop)
                    sock = bind_ops_socket(("127.0.0.1", 0))
                    # In the test's nursery: it answers until the test ends, after the stop.
                    found["http"] = (await nursery.start(serve_ops, sock, endpoints))[1]
                    await serve(config, stop=stop, running=running, task_status=task_status)
            finally:
                stopped.set()

        bound = await nursery.start(run)
        return OpsProxy(bound[0][2], found["http"], found["running"], stop, stopped)

    return start
