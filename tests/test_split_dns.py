"""Split DNS in the running proxy: forwarded zones, plain: resolvers, local answers, ECS.

In-process, over real loopback sockets: two fake DoT upstreams (the default one and a zone's),
a fake cleartext resolver (UDP and TCP) for plain: zones, dnspython reading every answer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing

from dot_proxy.config import ForwardZone, parse_forward
from dot_proxy.core.zones import name_to_wire
from tests.clients import query, tcp_exchange, udp_exchange
from tests.conftest import RunningProxy, StartPlain, StartProxy, StartUpstream
from tests.fakes import (
    Address,
    FakePlainServer,
    FakeUpstream,
    answer_for,
    answering,
    truncate,
)

EXCHANGES = [pytest.param(udp_exchange, id="udp"), pytest.param(tcp_exchange, id="tcp")]


async def ask(
    proxy: RunningProxy,
    name: str,
    rdtype: str = "A",
    exchange: object = udp_exchange,
    **kwargs: object,
) -> dns.message.Message:
    reply = await exchange(proxy.port, query(name, rdtype, **kwargs).to_wire())  # type: ignore[operator]
    assert reply is not None
    return dns.message.from_wire(reply)


def names_asked(messages: list[bytes]) -> list[str]:
    return [dns.message.from_wire(m).question[0].name.to_text().lower() for m in messages]


def first_address(reply: dns.message.Message) -> str:
    return str(reply.answer[0][0])


def forward(zone: str, spec: str) -> ForwardZone:
    return parse_forward(f"{zone}={spec}")


async def lan_proxy(
    start_upstream: StartUpstream, start_proxy: StartProxy, router: FakePlainServer
) -> RunningProxy:
    """A proxy that sends lan. to ``router`` (plain:) and the rest to a fake DoT upstream."""
    return await start_proxy([await start_upstream()], forward=(forward("lan", router.spec.label),))


async def corp_and_default(
    start_upstream: StartUpstream, start_proxy: StartProxy, **options: object
) -> tuple[FakeUpstream, FakeUpstream, RunningProxy]:
    """Two fake DoT upstreams, the default one and corp.example's, and a proxy over them."""
    default = await start_upstream()
    corp = await start_upstream()
    proxy = await start_proxy([default], forward=(forward("corp.example", corp.spec),), **options)
    return default, corp, proxy


# --- forwarded zones ---------------------------------------------------------------------


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_a_forwarded_zone_reaches_only_its_own_upstream(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, exchange: object
) -> None:
    default = await start_upstream(answering(lambda q: answer_for(q, address="192.0.2.1")))
    corp = await start_upstream(answering(lambda q: answer_for(q, address="10.8.0.7")))
    proxy = await start_proxy([default], forward=(forward("corp.example.", corp.spec),))
    assert first_address(await ask(proxy, "www.example.com", exchange=exchange)) == "192.0.2.1"
    assert first_address(await ask(proxy, "wiki.CORP.example", exchange=exchange)) == "10.8.0.7"
    assert first_address(await ask(proxy, "corp.example", exchange=exchange)) == "10.8.0.7"
    # Not under corp.example on a label boundary: the default upstreams.
    assert first_address(await ask(proxy, "xcorp.example", exchange=exchange)) == "192.0.2.1"
    assert names_asked(default.queries) == ["www.example.com.", "xcorp.example."]
    assert names_asked(corp.queries) == ["wiki.corp.example.", "corp.example."]


async def test_a_zone_has_its_own_health_and_failures(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    _, _, proxy = await corp_and_default(start_upstream, start_proxy)
    zone = proxy.resolver.routes.forwards[name_to_wire("corp.example")]
    assert zone.group is not proxy.group
    assert zone.encrypted  # a DoT zone: padded like the default upstreams
    await ask(proxy, "wiki.corp.example")
    assert zone.group.health[0].answers == 1
    assert proxy.group.health[0].answers == 0


async def test_a_zones_answers_are_cached_in_the_shared_cache(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    default, corp, proxy = await corp_and_default(start_upstream, start_proxy, cache_size=100)
    for _ in range(3):
        assert (await ask(proxy, "wiki.corp.example")).rcode() == dns.rcode.NOERROR
        assert (await ask(proxy, "www.example.com")).rcode() == dns.rcode.NOERROR
    assert len(corp.queries) == 1
    assert len(default.queries) == 1


async def test_a_forward_zone_takes_a_built_in_reverse_zone_to_the_router(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    start_plain: StartPlain,
) -> None:
    default = await start_upstream()
    router = await start_plain()
    proxy = await start_proxy(
        [default], forward=(forward("168.192.in-addr.arpa", router.spec.label),)
    )
    reply = await ask(proxy, "10.1.168.192.in-addr.arpa", "PTR")
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(router.udp_queries) == 1
    # The other private reverse zones stay local.
    assert (await ask(proxy, "1.0.0.10.in-addr.arpa", "PTR")).rcode() == dns.rcode.NXDOMAIN
    assert not default.queries


# --- plain: resolvers --------------------------------------------------------------------


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_a_plain_target_answers_over_udp_unpadded(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    start_plain: StartPlain,
    exchange: object,
) -> None:
    default = await start_upstream()
    router = await start_plain()
    proxy = await start_proxy([default], forward=(forward("lan", router.spec.label),))
    request = query("printer.lan", "A")
    request.id = 0x1234
    reply_wire = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    reply = dns.message.from_wire(reply_wire)
    assert reply.id == 0x1234
    assert reply.question == request.question
    assert first_address(reply) == "192.0.2.1"
    assert not default.queries
    [(sent, _)] = router.udp_queries
    # Cleartext: no padding (it hides nothing there), and no OPT the client did not send.
    assert dns.message.from_wire(sent).edns == -1
    assert sent[2:] == request.to_wire()[2:]
    assert not proxy.resolver.routes.forwards[name_to_wire("lan")].encrypted


async def test_a_truncated_plain_answer_is_asked_again_over_tcp(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    start_plain: StartPlain,
) -> None:
    router = await start_plain(udp=truncate)
    proxy = await lan_proxy(start_upstream, start_proxy, router)
    reply = await ask(proxy, "nas.lan")
    assert first_address(reply) == "192.0.2.1"
    assert not reply.flags & dns.flags.TC
    assert len(router.udp_queries) == 1
    assert len(router.tcp_queries) == 1


async def forge_then_answer(server: FakePlainServer, wire: bytes, source: Address) -> None:
    """A spoofer's answers first (wrong ID, then the right ID for another name), then the
    real one: only the last may be taken (RFC 5452 §9.1)."""
    real = dns.message.from_wire(wire)
    wrong_id = dns.message.make_response(real)
    wrong_id.id = (real.id + 1) & 0xFFFF
    wrong_id.answer.append(dns.rrset.from_text(real.question[0].name, 60, "IN", "A", "6.6.6.6"))
    other = dns.message.make_query("bank.example", "A")
    other.id = real.id
    wrong_question = dns.message.make_response(other)
    wrong_question.answer.append(dns.rrset.from_text("bank.example.", 60, "IN", "A", "6.6.6.7"))
    for forged in (wrong_id, wrong_question):
        await server.udp.sendto(forged.to_wire(), source)
    await server.udp.sendto(answer_for(wire), source)


async def test_a_forged_plain_answer_is_refused(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    start_plain: StartPlain,
) -> None:
    router = await start_plain(udp=forge_then_answer)
    proxy = await lan_proxy(start_upstream, start_proxy, router)
    reply = await ask(proxy, "printer.lan")
    assert reply.rcode() == dns.rcode.NOERROR
    assert [first_address(reply)] == ["192.0.2.1"]
    assert len(router.udp_queries) == 1  # the forgeries cost no retransmission


# --- names that never leave --------------------------------------------------------------


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize(
    ("name", "rdtype", "apex"),
    [
        ("1.1.168.192.in-addr.arpa", "PTR", "168.192.in-addr.arpa."),
        ("5.0.0.10.in-addr.arpa", "PTR", "10.in-addr.arpa."),
        (
            "d.c.b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa",
            "PTR",
            "d.f.ip6.arpa.",
        ),
        ("nas.home.arpa", "A", "home.arpa."),
        ("Printer.Local", "AAAA", "local."),
        ("x.invalid", "A", "invalid."),
        ("secret.onion", "A", "onion."),
    ],
)
async def test_private_names_are_answered_here_and_reach_no_upstream(
    hang_guard: None,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    exchange: object,
    name: str,
    rdtype: str,
    apex: str,
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    request = query(name, rdtype)
    reply_wire = await exchange(proxy.port, request.to_wire())  # type: ignore[operator]
    reply = dns.message.from_wire(reply_wire)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.id == request.id
    assert reply.question == request.question
    assert (
        reply_wire[12 : 12 + len(name) + 6].lower()
        == request.to_wire()[12 : 12 + len(name) + 6].lower()
    )
    assert reply.flags & dns.flags.AA
    [soa] = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name.to_text().lower() == apex
    assert not upstream.queries
    assert upstream.connections == 0
    assert proxy.stats.local == 1


async def test_the_question_comes_back_as_the_client_wrote_it(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([await start_upstream()])
    request = query("NaS.HoMe.ArPa", "A")
    reply = await udp_exchange(proxy.port, request.to_wire())
    wire = request.to_wire()
    end = wire.index(b"\x00", 12) + 5
    assert reply[12:end] == wire[12:end]


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_localhost_is_the_loopback_host(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, exchange: object
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    assert first_address(await ask(proxy, "localhost", exchange=exchange)) == "127.0.0.1"
    assert first_address(await ask(proxy, "db.localhost", "AAAA", exchange=exchange)) == "::1"
    ptr = await ask(proxy, "1.0.0.127.in-addr.arpa", "PTR", exchange=exchange)
    assert str(ptr.answer[0][0]) == "localhost."
    assert not upstream.queries


async def test_no_local_zones_forwards_them(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], local_zones=False)
    await ask(proxy, "nas.home.arpa")
    await ask(proxy, "1.1.168.192.in-addr.arpa", "PTR")
    assert names_asked(upstream.queries) == ["nas.home.arpa.", "1.1.168.192.in-addr.arpa."]


async def test_a_local_answer_obeys_the_udp_size_of_a_client_without_edns(
    hang_guard: None, tmp_path: Path, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"10.0.{i // 250}.{i % 250 + 1} many.lan\n" for i in range(100)))
    proxy = await start_proxy([await start_upstream()], hosts_file=str(hosts))
    udp = dns.message.from_wire(await udp_exchange(proxy.port, query("many.lan").to_wire()))
    assert udp.flags & dns.flags.TC
    assert not udp.answer
    whole = await tcp_exchange(proxy.port, query("many.lan").to_wire())
    assert whole is not None
    assert len(dns.message.from_wire(whole).answer[0]) == 100


# --- the hosts file ------------------------------------------------------------------------

HOSTS = """\
# the home network
192.168.1.10   printer.lan printer   # two names
fd00::10       printer.lan
192.168.1.20   nas.lan
"""


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_hosts_answers_a_aaaa_ptr_and_nodata(
    hang_guard: None,
    tmp_path: Path,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    exchange: object,
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], hosts_file=str(hosts))
    assert first_address(await ask(proxy, "Printer.LAN", exchange=exchange)) == "192.168.1.10"
    assert first_address(await ask(proxy, "printer", exchange=exchange)) == "192.168.1.10"
    assert first_address(await ask(proxy, "printer.lan", "AAAA", exchange=exchange)) == "fd00::10"
    ptr = await ask(proxy, "10.1.168.192.in-addr.arpa", "PTR", exchange=exchange)
    assert str(ptr.answer[0][0]) == "printer.lan."
    ptr6 = await ask(
        proxy,
        "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa",
        "PTR",
        exchange=exchange,
    )
    assert str(ptr6.answer[0][0]) == "printer.lan."
    for name, rdtype in (("nas.lan", "AAAA"), ("printer.lan", "MX")):
        nodata = await ask(proxy, name, rdtype, exchange=exchange)
        assert nodata.rcode() == dns.rcode.NOERROR
        assert not nodata.answer
        assert [rrset.rdtype for rrset in nodata.authority] == [dns.rdatatype.SOA]
    assert not upstream.queries
    # Names the file does not list go upstream as usual.
    await ask(proxy, "tv.lan", exchange=exchange)
    assert names_asked(upstream.queries) == ["tv.lan."]


async def test_a_name_added_to_the_hosts_file_replaces_the_cached_answer(
    hang_guard: None, tmp_path: Path, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], hosts_file=str(hosts), cache_size=100)
    for _ in range(2):
        assert first_address(await ask(proxy, "tv.lan")) == "192.0.2.1"
    assert len(upstream.queries) == 1  # the second came from the cache
    hosts.write_text(HOSTS + "192.168.1.30 tv.lan\n")
    assert await proxy.resolver.routes.reload_hosts()
    for _ in range(2):
        assert first_address(await ask(proxy, "tv.lan")) == "192.168.1.30"
    assert len(upstream.queries) == 1


# --- EDNS Client Subnet ----------------------------------------------------------------------

ECS = dns.edns.ECSOption("198.51.100.0", 24)
COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01\x02\x03\x04\x05\x06\x07\x08")


def answer_with_ecs(wire: bytes) -> bytes:
    """An upstream that tailors its answer to a subnet, and says so in its OPT record."""
    response = dns.message.make_response(dns.message.from_wire(wire))
    response.use_edns(0, 0, 1232, options=[dns.edns.ECSOption("198.51.100.0", 24, 24)])
    response.answer.append(
        dns.rrset.from_text(response.question[0].name, 300, "IN", "A", "192.0.2.99")
    )
    return response.to_wire()


@pytest.mark.parametrize("padding", [False, True])
async def test_the_client_subnet_is_removed_on_the_way_out_and_back(
    hang_guard: None, start_upstream: StartUpstream, start_proxy: StartProxy, padding: bool
) -> None:
    upstream = await start_upstream(answering(answer_with_ecs))
    proxy = await start_proxy([upstream], padding=padding)
    reply = await ask(proxy, "www.example.com", use_edns=0, options=[ECS, COOKIE])
    sent = dns.message.from_wire(upstream.queries[0])
    codes = [option.otype for option in sent.options]
    assert dns.edns.OptionType.ECS not in codes
    assert dns.edns.OptionType.COOKIE in codes
    assert reply.edns == 0
    assert not [o for o in reply.options if o.otype == dns.edns.OptionType.ECS]
    assert first_address(reply) == "192.0.2.99"


async def test_keep_ecs_passes_it_both_ways_and_bypasses_the_cache(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream = await start_upstream(answering(answer_with_ecs))
    proxy = await start_proxy([upstream], keep_ecs=True, cache_size=100)
    for _ in range(2):
        reply = await ask(proxy, "www.example.com", use_edns=0, options=[ECS])
        assert [o.otype for o in reply.options] == [dns.edns.OptionType.ECS]
    assert len(upstream.queries) == 2
    assert all(
        dns.edns.OptionType.ECS in [o.otype for o in dns.message.from_wire(q).options]
        for q in upstream.queries
    )


async def test_with_ecs_removed_a_subnet_query_shares_the_cache(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], cache_size=100)
    await ask(proxy, "www.example.com", use_edns=0)
    for subnet in ("198.51.100.0", "203.0.113.0"):
        options = [dns.edns.ECSOption(subnet, 24)]
        reply = await ask(proxy, "www.example.com", use_edns=0, options=options)
        assert first_address(reply) == "192.0.2.1"
    assert len(upstream.queries) == 1


# --- TLS session resumption ------------------------------------------------------------------


async def test_a_reconnection_resumes_the_tls_session(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream], upstream_idle_timeout=2.0)
    await ask(proxy, "one.example")
    await trio.sleep(10)  # the idle connection closes
    assert not proxy.group.upstreams[0].connections
    await ask(proxy, "two.example")
    assert upstream.handshakes == 2
    assert upstream.session_reused == [False, True]


async def test_a_zone_upstream_resumes_its_own_sessions(
    hang_guard: None,
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    default, corp, proxy = await corp_and_default(
        start_upstream, start_proxy, upstream_idle_timeout=2.0
    )
    await ask(proxy, "a.corp.example")
    await ask(proxy, "www.example.com")
    await trio.sleep(10)
    await ask(proxy, "b.corp.example")
    await ask(proxy, "www.example.org")
    assert corp.session_reused == [False, True]
    assert default.session_reused == [False, True]


# --- the start-up log ----------------------------------------------------------------------


async def test_the_start_up_log_names_each_zone_and_warns_of_cleartext(
    hang_guard: None,
    tmp_path: Path,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    start_plain: StartPlain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS + "bogus line\n")
    corp = await start_upstream()
    router = await start_plain()
    with caplog.at_level(logging.INFO):
        await start_proxy(
            [await start_upstream()],
            forward=(forward("corp.example", corp.spec), forward("lan", router.spec.label)),
            hosts_file=str(hosts),
        )
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, f"forwarding corp.example. over TLS to {corp.spec}") in records
    cleartext = [m for level, m in records if level == logging.WARNING and "CLEARTEXT" in m]
    assert cleartext == [
        f"queries for lan. and the names under it leave in CLEARTEXT to {router.spec.label}"
        " (plain DNS: anyone on the path can read and alter them)"
    ]
    assert any(level == logging.WARNING and "line 5" in m for level, m in records)
    assert any("3 names and 3 addresses answered here, 1 lines skipped" in m for _, m in records)
    assert any(m.startswith("answering here, never upstream: localhost.") for _, m in records)
