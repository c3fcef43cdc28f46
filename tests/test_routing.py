"""The routes (dot_proxy/routing.py): the hosts file read, re-read on change, swapped whole,
and the cached answers its new names replace dropped. No sockets: the targets are stand-ins."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import dns.message
import pytest
import trio
import trio.testing

from dot_proxy.config import Config, parse_upstream, read_hosts
from dot_proxy.core.cache import AnswerCache, cache_key
from dot_proxy.core.local_zones import Forward, Local
from dot_proxy.core.message import HEADER_SIZE, parse_query
from dot_proxy.core.zones import name_to_wire
from dot_proxy.routing import HOSTS_POLL_INTERVAL, Routes, Target
from dot_proxy.upstream.group import UpstreamGroup
from tests.fakes import answer_for

DEFAULT = Target(cast(UpstreamGroup, "default group"))
ROUTER_LAN = Target(cast(UpstreamGroup, "router group"), encrypted=False)


def key(name: str, rdtype: str = "A") -> bytes:
    return parse_query(dns.message.make_query(name, rdtype).to_wire()).question_key


def config(hosts: Path | None = None, **options: Any) -> Config:
    return Config(
        upstreams=(parse_upstream("127.0.0.1:853#dns.test"),),
        hosts_file=None if hosts is None else str(hosts),
        **options,
    )


def routes_for(hosts: Path, cache: AnswerCache | None = None) -> Routes:
    # As open_resolver does: the file as read at start, then the routes over it.
    table, _ = read_hosts(str(hosts))
    return Routes(config(hosts), DEFAULT, cache=cache, hosts=table)


def printer_only(tmp_path: Path) -> tuple[Path, Routes]:
    """A hosts file listing printer.lan, and the routes over it."""
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\n")
    return hosts, routes_for(hosts)


def answered_here(routes: Routes, name: str, rdtype: str = "A") -> bool:
    return isinstance(routes.route(key(name, rdtype)), Local)


def cache_answer(cache: AnswerCache, name: str) -> bytes:
    wire = dns.message.make_query(name, "A").to_wire()
    query = parse_query(wire)
    stored_under = cache_key(query)
    assert stored_under is not None
    assert cache.put(stored_under, answer_for(wire), HEADER_SIZE + len(query.question), 0.0)
    return stored_under


def rewrite(path: Path, text: str) -> None:
    """Write a new version of the file as editors and tools do: a new file renamed over it."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def test_routes_without_hosts_forward_to_the_default_and_zones() -> None:
    routes = Routes(config(), DEFAULT, {name_to_wire("lan"): ROUTER_LAN})
    assert routes.route(key("www.example.com")) == Forward(DEFAULT, b"\x00")
    assert routes.route(key("printer.lan")) == Forward(ROUTER_LAN, name_to_wire("lan"))
    assert answered_here(routes, "localhost")
    assert answered_here(routes, "1.1.168.192.in-addr.arpa", "PTR")


def test_no_local_zones_forwards_the_built_in_names() -> None:
    routes = Routes(config(local_zones=False), DEFAULT)
    assert routes.route(key("db.home.arpa")) == Forward(DEFAULT, b"\x00")


async def test_without_a_hosts_file_there_is_nothing_to_reload() -> None:
    assert not await Routes(config(), DEFAULT).reload_hosts()


async def test_a_reload_answers_from_the_new_file_and_drops_what_the_cache_had(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\n")
    cache = AnswerCache(size=100)
    routes = routes_for(hosts, cache)
    nas_key = cache_answer(cache, "nas.lan")
    other_key = cache_answer(cache, "www.example.com")
    before = routes.router
    assert answered_here(routes, "printer.lan")
    assert not answered_here(routes, "nas.lan")

    rewrite(hosts, "192.168.1.10 printer.lan\n192.168.1.20 nas.lan\n")
    with caplog.at_level(logging.INFO, logger="dot_proxy.routing"):
        assert await routes.reload_hosts()
    assert routes.router is not before
    assert routes.generation == 1
    assert answered_here(routes, "nas.lan")
    assert answered_here(routes, "20.1.168.192.in-addr.arpa", "PTR")
    # The cache no longer holds the upstream's answer for the name the file now lists.
    assert cache.get(nas_key, 1.0) is None
    assert cache.get(other_key, 1.0) is not None
    assert "2 names and 2 addresses answered here" in caplog.text
    assert "dropped 1 cached answers" in caplog.text


async def test_a_file_that_cannot_be_read_keeps_the_last_reading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hosts, routes = printer_only(tmp_path)
    hosts.unlink()
    hosts.mkdir()  # there, but not a file one can read
    with caplog.at_level(logging.WARNING, logger="dot_proxy.routing"):
        assert not await routes.reload_hosts()
    assert answered_here(routes, "printer.lan")
    assert routes.generation == 0
    assert "cannot be read" in caplog.text
    assert "still answering from the last reading" in caplog.text


async def test_problems_are_logged_with_their_line_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hosts, routes = printer_only(tmp_path)
    rewrite(hosts, "# comment\n192.168.1.10 printer.lan\nnot-an-address nas.lan\n10.0.0.1\n")
    with caplog.at_level(logging.WARNING, logger="dot_proxy.routing"):
        assert await routes.reload_hosts()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("line 3: not an IPv4 or IPv6 address" in line for line in warnings), warnings
    assert any("line 4: no host name after the address" in line for line in warnings), warnings


async def next_reading(routes: Routes) -> None:
    """Wait until the watch has read the hosts file again. Its look at the file and its
    reading run in threads, which the test's virtual clock does not wait for: a fixed sleep
    could end before they do on a busy machine (the clock jumps while trio is idle)."""
    generation = routes.generation
    with trio.fail_after(HOSTS_POLL_INTERVAL * 20):
        while routes.generation == generation:  # noqa: ASYNC110 (a thread sets it)
            await trio.sleep(0.1)


async def test_a_change_is_seen_by_the_watch(
    tmp_path: Path, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    hosts, routes = printer_only(tmp_path)
    nursery.start_soon(routes.watch_hosts)
    await trio.sleep(HOSTS_POLL_INTERVAL * 2)
    assert routes.generation == 0  # nothing changed, nothing read
    rewrite(hosts, "192.168.1.20 nas.lan\n")
    await next_reading(routes)
    assert routes.generation == 1
    assert answered_here(routes, "nas.lan")
    assert not answered_here(routes, "printer.lan")
    # An edit in place (same inode) that changes the size is seen too.
    with hosts.open("a") as file:
        file.write("192.168.1.30 tv.lan\n")
    await next_reading(routes)
    assert answered_here(routes, "tv.lan")


async def test_a_removed_file_is_warned_about_once_and_read_when_it_is_back(
    tmp_path: Path,
    nursery: trio.Nursery,
    clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hosts, routes = printer_only(tmp_path)
    nursery.start_soon(routes.watch_hosts)
    hosts.unlink()
    with caplog.at_level(logging.WARNING, logger="dot_proxy.routing"):
        with trio.fail_after(HOSTS_POLL_INTERVAL * 20):  # the first look, in a thread
            while "does not exist" not in caplog.text:  # noqa: ASYNC110 (a thread logs it)
                await trio.sleep(0.1)
        await trio.sleep(HOSTS_POLL_INTERVAL * 4)  # four more looks: no second warning
    assert caplog.text.count("does not exist") == 1
    assert answered_here(routes, "printer.lan")
    hosts.write_text("192.168.1.20 nas.lan\n")
    await next_reading(routes)
    assert answered_here(routes, "nas.lan")
