"""Reload in process: a changed config file applied while queries run, and a bad one refused.

The proxy runs from a real config file (``build_config(["--config", FILE])``); the reload is
what SIGHUP does (``reloading.reload`` with the command line's own rebuild), called directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from dot_proxy import cli
from dot_proxy.cli import build_config
from dot_proxy.config import Config, parse_upstream
from dot_proxy.reloading import reload
from dot_proxy.upstream.registry import pool_changes
from tests.clients import query, scrape, udp_exchange
from tests.conftest import OpsProxy, StartOpsProxy, StartUpstream
from tests.fakes import FakeUpstream, Held, eventually


def write_file(path: Path, text: str) -> None:
    # A small file on a test's tmp_path: blocking is fine (a sync call keeps ASYNC240 quiet).
    path.write_text(text)


def config_text(upstreams: list[FakeUpstream], ca_file: str, extra: str = "") -> str:
    listed = ", ".join(f'"{upstream.spec}"' for upstream in upstreams)
    return (
        f'listen = ["127.0.0.1"]\nport = 0\nupstream = [{listed}]\nca-file = "{ca_file}"\n'
        f"cache-size = 0\n{extra}"
    )


async def start_from_file(
    start_ops_proxy: StartOpsProxy, path: Path, text: str
) -> tuple[OpsProxy, list[str]]:
    write_file(path, text)
    argv = ["--config", str(path)]
    return await start_ops_proxy(config=build_config(argv, {})), argv


async def reload_now(proxy: OpsProxy, argv: list[str]) -> bool:
    return await reload(proxy.running, cli._rebuild(argv, {}))


async def past_the_deadline_of(old: Config) -> None:
    """Sleep until a reload from ``old`` has retired its groups: every query that could still
    use them had ``old.timeout`` at most."""
    await trio.sleep(old.timeout + 0.1)


@pytest.fixture
def root_log_level() -> Iterator[None]:
    """Puts the root logger's level back after a test whose reload changes it."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


async def test_a_reload_moves_queries_to_a_new_upstream_and_loses_none(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
    hang_guard: None,
) -> None:
    first, second = await start_upstream(), await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([first], ca_file))
    rcodes: list[int] = []
    reloaded = trio.Event()

    async def client(number: int) -> None:
        # Queries one after another, before, during and after the reload.
        for index in range(40):
            answer = await udp_exchange(proxy.port, query(f"c{number}-{index}.example.").to_wire())
            rcodes.append(answer[3] & 0x0F)
            if index == 20:
                await reloaded.wait()

    async with trio.open_nursery() as nursery:
        for number in range(8):
            nursery.start_soon(client, number)
        await eventually(lambda: len(rcodes) >= 40)
        old_group = proxy.running.resolver.group
        path.write_text(config_text([second], ca_file))
        assert await reload_now(proxy, argv)
        reloaded.set()
    assert rcodes == [0] * 320  # every query answered, none lost, none SERVFAIL
    assert proxy.running.config.upstreams[0].port == second.port
    assert len(second.queries) > 0
    arrived_first = len(first.queries)
    await udp_exchange(proxy.port, query("after.example.").to_wire())
    assert len(first.queries) == arrived_first  # nothing new goes to the removed upstream
    # Once its queries had their time, the old group's connections close.
    assert old_group in proxy.running.groups
    await past_the_deadline_of(proxy.running.config)
    assert old_group not in proxy.running.groups
    assert not old_group.upstreams[0].connections
    # Its counts stay until the upstream is gone from the configuration: then it goes.
    metrics = await scrape(proxy.http)
    assert metrics['dot_proxy_config_reloads_total{result="success"}'] == 1
    assert not any(str(first.port) in key for key in metrics)
    assert metrics[f'dot_proxy_upstream_queries_total{{upstream="{second.spec}"}}'] > 0


async def test_counters_of_an_upstream_kept_across_a_reload_do_not_go_back(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([upstream], ca_file))
    for index in range(3):
        await udp_exchange(proxy.port, query(f"k{index}.example.").to_wire())
    series = f'dot_proxy_upstream_queries_total{{upstream="{upstream.spec}"}}'
    assert (await scrape(proxy.http))[series] == 3
    before = proxy.running.config
    path.write_text(config_text([upstream], ca_file, "timeout = 4\n"))  # a new group
    assert await reload_now(proxy, argv)
    await udp_exchange(proxy.port, query("k9.example.").to_wire())
    assert (await scrape(proxy.http))[series] == 4  # old group draining + new
    await past_the_deadline_of(before)
    assert len(proxy.running.groups) == 1
    assert (await scrape(proxy.http))[series] == 4  # old group folded in


async def test_a_bad_file_on_reload_keeps_the_running_configuration(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "dot-proxy.toml"
    upstream = await start_upstream()
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([upstream], ca_file))
    before = proxy.running.config
    path.write_text(config_text([upstream], ca_file, "timeout = 'soon'\n"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dot_proxy"):
        assert not await reload_now(proxy, argv)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in errors] == [
        f"reload failed, the running configuration stays: {path}: timeout: expected a number, "
        "got a string"
    ]
    assert proxy.running.config is before
    metrics = await scrape(proxy.http)
    assert metrics['dot_proxy_config_reloads_total{result="error"}'] == 1
    assert metrics['dot_proxy_config_reloads_total{result="success"}'] == 0
    assert (await udp_exchange(proxy.port, query().to_wire()))[3] & 0x0F == 0


async def test_a_reload_applies_access_rate_limit_timeouts_cache_and_log_level(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    root_log_level: None,
) -> None:
    upstream = await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    base = config_text([upstream], ca_file).replace("cache-size = 0\n", "cache-size = 100\n")
    proxy, argv = await start_from_file(start_ops_proxy, path, base)
    cached = query("cached.example.").to_wire()
    await udp_exchange(proxy.port, cached)
    cache = proxy.running.cache
    assert cache is not None and len(cache) == 1
    group = proxy.running.resolver.group
    path.write_text(
        base.replace("cache-size = 100\n", "cache-size = 50\n")
        + 'allow = ["10.0.0.0/8"]\nratelimit = 100\ntcp-idle-timeout = 3\nlog-level = "warning"\n'
    )
    with caplog.at_level(logging.INFO, logger="dot_proxy"):
        assert await reload_now(proxy, argv)
    running = proxy.running
    assert running.resolver.group is group  # no upstream setting changed: same connections
    assert running.cache is cache and cache.size == 50 and len(cache) == 1  # kept, resized
    assert running.listening is not None
    assert running.listening.tcp_idle_timeout == 3.0
    assert running.listening.ratelimit is not None and running.listening.ratelimit.rate == 100
    assert logging.getLogger().level == logging.WARNING
    # 127.0.0.1 is no longer allowed: REFUSED.
    assert (await udp_exchange(proxy.port, cached))[3] & 0x0F == 5
    path.write_text(base.replace("cache-size = 100\n", "cache-size = 0\n"))
    assert await reload_now(proxy, argv)
    assert running.resolver.cache is None  # off; its counters still read
    assert (await scrape(proxy.http))["dot_proxy_cache_misses_total"] == 1


async def test_a_restart_only_setting_is_logged_and_kept(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([upstream], ca_file))
    path.write_text(
        config_text([upstream], ca_file).replace("port = 0", "port = 5353") + "timeout = 3\n"
    )
    with caplog.at_level(logging.INFO, logger="dot_proxy"):
        assert await reload_now(proxy, argv)
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"reload: {path}: port changed, which takes a restart; the running value is kept"
        in messages
    )
    assert f"reloaded {path}: timeout" in messages
    assert proxy.running.config.port == 0
    assert proxy.running.config.timeout == 3.0


async def test_sighup_without_a_config_file_changes_nothing(
    start_upstream: StartUpstream, start_ops_proxy: StartOpsProxy, ca_file: str
) -> None:
    proxy = await start_ops_proxy([await start_upstream()])
    config: Config = proxy.running.config
    assert not await reload(proxy.running, lambda old: old)
    assert proxy.running.config is config
    assert proxy.running.reloads == {"success": 0, "error": 0}


async def test_a_reload_gives_each_forward_zone_a_new_group_and_keeps_its_zones(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
    hang_guard: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    default, corp, other = await start_upstream(), await start_upstream(), await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    zone = f'forward = ["corp.example={corp.spec}"]\n'
    proxy, argv = await start_from_file(
        start_ops_proxy, path, config_text([default], ca_file, zone)
    )
    routes = proxy.running.resolver.routes
    [target] = routes.forwards.values()
    old_zone_group = target.group
    await udp_exchange(proxy.port, query("a.corp.example.").to_wire())
    assert len(corp.queries) == 1
    # An upstream setting changed: the zone gets a new group too; the zone itself stays.
    before = proxy.running.config
    path.write_text(config_text([default], ca_file, zone + "timeout = 4\n"))
    assert await reload_now(proxy, argv)
    assert target.group is not old_zone_group
    assert routes.default.group is proxy.running.resolver.group
    await udp_exchange(proxy.port, query("b.corp.example.").to_wire())
    await udp_exchange(proxy.port, query("www.example.com.").to_wire())
    assert len(corp.queries) == 2
    assert len(default.queries) == 1
    await past_the_deadline_of(before)
    assert old_zone_group not in proxy.running.groups
    assert target.group in proxy.running.groups
    # Another zone layout takes a restart: logged, and the running one kept.
    path.write_text(config_text([default], ca_file, f'forward = ["corp.example={other.spec}"]\n'))
    with caplog.at_level(logging.WARNING):
        assert await reload_now(proxy, argv)
    assert "forward changed, which takes a restart" in caplog.text
    await udp_exchange(proxy.port, query("c.corp.example.").to_wire())
    assert len(corp.queries) == 3
    assert not other.queries


async def test_a_reload_that_adds_an_upstream_keeps_the_connections_of_the_others(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
    hang_guard: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = await start_upstream(), await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([first], ca_file))
    for index in range(3):
        await udp_exchange(proxy.port, query(f"warm{index}.example.").to_wire())
    old_group = proxy.running.resolver.group
    [pool] = old_group.upstreams
    [health] = old_group.health
    path.write_text(config_text([first, second], ca_file, 'upstream-policy = "fastest"\n'))
    with caplog.at_level(logging.INFO, logger="dot_proxy"):
        assert await reload_now(proxy, argv)
    assert (
        f"upstreams reloaded: connections kept: {first.spec}; new connections: {second.spec}"
        in caplog.messages
    )
    group = proxy.running.resolver.group
    assert group is not old_group
    # The unchanged upstream: the same pool, its warm connection, and what was learnt of it.
    assert group.upstreams[0] is pool and group.health[0] is health
    for index in range(20):
        await udp_exchange(proxy.port, query(f"after{index}.example.").to_wire())
    await past_the_deadline_of(proxy.running.config)  # the old group retires
    assert old_group not in proxy.running.groups
    assert first.handshakes == 1  # never reconnected
    assert pool.connections  # still open, still used
    assert len(first.queries) > 3
    metrics = await scrape(proxy.http)
    assert metrics[f'dot_proxy_upstream_queries_total{{upstream="{first.spec}"}}'] == len(
        first.queries
    )
    assert metrics[f'dot_proxy_upstream_connections{{upstream="{first.spec}"}}'] == 1


async def test_a_reload_that_changes_how_connections_are_made_opens_new_ones(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
    hang_guard: None,
) -> None:
    upstream = await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([upstream], ca_file))
    await udp_exchange(proxy.port, query("before.example.").to_wire())
    [old_pool] = proxy.running.resolver.group.upstreams
    [health] = proxy.running.resolver.group.health
    path.write_text(config_text([upstream], ca_file, "max-pipeline = 10\n"))
    assert await reload_now(proxy, argv)
    [pool] = proxy.running.resolver.group.upstreams
    assert pool is not old_pool  # a changed setting of its connections: a new pool
    assert proxy.running.resolver.group.health[0] is health  # the same resolver, though
    await udp_exchange(proxy.port, query("after.example.").to_wire())
    assert upstream.handshakes == 2
    await past_the_deadline_of(proxy.running.config)
    assert not old_pool.connections  # the old pool closed once its queries had their time
    metrics = await scrape(proxy.http)
    assert metrics[f'dot_proxy_upstream_queries_total{{upstream="{upstream.spec}"}}'] == 2
    assert metrics[f'dot_proxy_upstream_connections{{upstream="{upstream.spec}"}}'] == 1


async def test_a_query_in_flight_on_a_removed_upstream_finishes_there(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
    hang_guard: None,
) -> None:
    held = Held()
    removed, kept = await start_upstream(held), await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    proxy, argv = await start_from_file(start_ops_proxy, path, config_text([removed], ca_file))
    answers: list[bytes] = []

    async def ask() -> None:
        answers.append(await udp_exchange(proxy.port, query("slow.example.").to_wire()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await removed.wait_for_queries(1)
        [old_pool] = proxy.running.resolver.group.upstreams
        path.write_text(config_text([kept], ca_file))
        assert await reload_now(proxy, argv)
        await udp_exchange(proxy.port, query("new.example.").to_wire())
        assert len(kept.queries) == 1
        assert old_pool.connections  # still carrying the query in flight
        await held.release()
    [answer] = answers
    assert answer[3] & 0x0F == 0  # answered by the removed upstream, not SERVFAIL
    await past_the_deadline_of(proxy.running.config)
    assert not old_pool.connections
    assert removed.handshakes == 1


async def test_an_upstream_both_default_and_in_a_zone_has_one_pool(
    start_upstream: StartUpstream,
    start_ops_proxy: StartOpsProxy,
    ca_file: str,
    tmp_path: Path,
    clock: trio.testing.MockClock,
) -> None:
    upstream = await start_upstream()
    path = tmp_path / "dot-proxy.toml"
    zone = f'forward = ["corp.example={upstream.spec}"]\n'
    proxy, argv = await start_from_file(
        start_ops_proxy, path, config_text([upstream], ca_file, zone)
    )
    await udp_exchange(proxy.port, query("www.example.com.").to_wire())
    await udp_exchange(proxy.port, query("a.corp.example.").to_wire())
    assert len(upstream.queries) == 2
    assert upstream.handshakes == 1  # one connection serves both routes
    [(label, health, connections)] = proxy.running.upstreams
    assert label == upstream.spec and health.answers == 2 and len(connections) == 1
    # A reload that changes nothing of the pool keeps it for both routes.
    path.write_text(config_text([upstream], ca_file, zone + 'upstream-policy = "fastest"\n'))
    assert await reload_now(proxy, argv)
    await udp_exchange(proxy.port, query("b.corp.example.").to_wire())
    await udp_exchange(proxy.port, query("www2.example.com.").to_wire())
    assert upstream.handshakes == 1
    metrics = await scrape(proxy.http)
    assert metrics[f'dot_proxy_upstream_queries_total{{upstream="{upstream.spec}"}}'] == 4


def test_the_log_says_which_upstreams_keep_their_connections() -> None:
    kept, added, removed = (parse_upstream(f"127.0.0.{n}:853#dns.test") for n in (1, 2, 3))
    old = Config(upstreams=(kept, removed))
    assert pool_changes(old, Config(upstreams=(kept, added))) == (
        "connections kept: 127.0.0.1:853#dns.test; new connections: 127.0.0.2:853#dns.test; "
        "closing once their queries are done: 127.0.0.3:853#dns.test"
    )
    # A setting every connection reads: each upstream gets new ones, the old close.
    assert pool_changes(old, Config(upstreams=(kept, removed), max_pipeline=10)) == (
        "new connections: 127.0.0.1:853#dns.test, 127.0.0.3:853#dns.test; "
        "closing once their queries are done: 127.0.0.1:853#dns.test, 127.0.0.3:853#dns.test"
    )
    assert pool_changes(old, Config(upstreams=(kept, removed), hedge_after=0.0)) == (
        "connections kept: 127.0.0.1:853#dns.test, 127.0.0.3:853#dns.test"
    )
