"""Fixtures shared by the in-process tests: a trustme CA, fake upstreams, a proxy on port 0."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trustme

from dot_proxy.config import Config, parse_upstream
from dot_proxy.handler import ServerStats
from dot_proxy.serve.server import serve
from dot_proxy.upstream.group import UpstreamGroup, open_upstream_group
from tests.fakes import Behaviour, FakeUpstream, answer_all


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
    the upstream group it asks, for a test to look at its health records."""

    port: int
    config: Config
    stats: ServerStats
    stop: trio.Event
    resolver: UpstreamGroup


StartUpstream = Callable[..., Awaitable[FakeUpstream]]
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
def start_proxy(ca_file: str, nursery: trio.Nursery) -> StartProxy:
    """``await start_proxy([upstream, ...], **config_fields)`` → a RunningProxy.

    The fixture opens the upstream group and hands it to ``serve`` (its ``resolver=`` seam), so
    a test can reach it; ``serve`` opening its own is what tests/test_server_lifecycle.py runs.
    """

    async def start(upstreams: list[FakeUpstream], **options: Any) -> RunningProxy:
        options.setdefault("ca_file", ca_file)
        config = Config(
            upstreams=tuple(parse_upstream(u.spec) for u in upstreams),
            listen=("127.0.0.1",),
            port=0,
            **options,
        )
        stats = ServerStats()
        stop = trio.Event()
        opened: list[UpstreamGroup] = []

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            async with open_upstream_group(config) as resolver:
                opened.append(resolver)
                await serve(
                    config, stop=stop, stats=stats, resolver=resolver, task_status=task_status
                )

        bound = await nursery.start(run)
        return RunningProxy(bound[0][2], config, stats, stop, opened[0])

    return start
