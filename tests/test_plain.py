"""The plain: transport (upstream/plain.py) against a fake UDP + TCP DNS server on loopback."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.rrset
import pytest
import trio
import trio.testing

from dot_proxy.config import PlainSpec
from dot_proxy.core.framing import FrameDecoder, frame
from dot_proxy.core.message import message_id, parse_query, replace_id
from dot_proxy.errors import (
    RaceLost,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamProtocolError,
)
from dot_proxy.upstream.plain import PlainUpstream
from dot_proxy.upstream.race import Race
from tests.conftest import StartPlain
from tests.fakes import (
    Address,
    FakePlainServer,
    answer_for,
    truncate,
)


def make_query(name: str = "www.example.com", rdtype: str = "A") -> tuple[bytes, bytes]:
    wire = dns.message.make_query(name, rdtype, use_edns=False).to_wire()
    return wire, parse_query(wire).question_key


def address_of(answer: bytes) -> str:
    [rrset] = dns.message.from_wire(answer).answer
    text: str = rrset[0].to_text()
    return text


def forged(query: bytes, *, new_id: int | None = None, name: str | None = None) -> bytes:
    """An answer pointing at 6.6.6.6: with another ID, or for another question."""
    message = dns.message.from_wire(query)
    if name is not None:
        message = dns.message.make_query(name, "A", use_edns=False)
        message.id = dns.message.from_wire(query).id
    response = dns.message.make_response(message)
    response.answer.append(dns.rrset.from_text(message.question[0].name, 60, "IN", "A", "6.6.6.6"))
    wire: bytes = response.to_wire()
    return wire if new_id is None else replace_id(wire, new_id)


async def test_a_udp_query_is_answered(start_plain: StartPlain, nursery: trio.Nursery) -> None:
    server = await start_plain()
    upstream = PlainUpstream(server.spec, nursery)
    query, key = make_query()
    answer = await upstream.query(query, key)
    assert address_of(answer) == "192.0.2.1"
    assert len(server.udp_queries) == 1
    assert server.tcp_queries == []


async def test_each_query_has_a_random_id_and_source_port(
    start_plain: StartPlain, nursery: trio.Nursery
) -> None:
    server = await start_plain()
    upstream = PlainUpstream(server.spec, nursery)
    query, key = make_query()
    for _ in range(6):
        await upstream.query(query, key)
    ids = {message_id(data) for data, _ in server.udp_queries}
    ports = {source[1] for _, source in server.udp_queries}
    # RFC 5452 §9.2: six draws of 16 bits, and of ~28,000 ports, are all equal with
    # probability far below 1e-20.
    assert len(ids) > 1
    assert len(ports) > 1


async def test_a_truncated_answer_is_asked_again_over_tcp(
    start_plain: StartPlain, nursery: trio.Nursery
) -> None:
    server = await start_plain(udp=truncate)
    upstream = PlainUpstream(server.spec, nursery)
    query, key = make_query()
    answer = await upstream.query(query, key)
    assert address_of(answer) == "192.0.2.1"
    assert not dns.message.from_wire(answer).flags & dns.flags.TC
    assert len(server.udp_queries) == 1
    assert len(server.tcp_queries) == 1


async def test_forged_answers_are_refused_and_the_real_one_accepted(
    start_plain: StartPlain, nursery: trio.Nursery
) -> None:
    async def forge_first(server: FakePlainServer, query: bytes, source: Address) -> None:
        query_id = message_id(query)
        # Another ID, another question, another sender, a query instead of an answer, junk.
        await server.udp.sendto(forged(query, new_id=query_id ^ 0x5A5A), source)
        await server.udp.sendto(forged(query, name="www.example.org"), source)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            await other.bind(("127.0.0.1", 0))
            await other.sendto(forged(query), source)
        await server.udp.sendto(query, source)
        await server.udp.sendto(b"\x00", source)
        await server.udp.sendto(answer_for(query), source)

    server = await start_plain(udp=forge_first)
    upstream = PlainUpstream(server.spec, nursery)
    query, key = make_query()
    answer = await upstream.query(query, key)
    assert address_of(answer) == "192.0.2.1"


async def test_the_question_matches_whatever_its_case(
    start_plain: StartPlain, nursery: trio.Nursery
) -> None:
    async def upper(server: FakePlainServer, query: bytes, source: Address) -> None:
        answer = answer_for(query)
        await server.udp.sendto(answer.replace(b"example", b"EXAMPLE"), source)

    server = await start_plain(udp=upper)
    query, key = make_query()
    answer = await PlainUpstream(server.spec, nursery).query(query, key)
    assert b"EXAMPLE" in answer


async def test_a_lost_datagram_is_sent_again(
    start_plain: StartPlain, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    async def drop_first(server: FakePlainServer, query: bytes, source: Address) -> None:
        if len(server.udp_queries) >= 3:
            await server.udp.sendto(answer_for(query), source)

    server = await start_plain(udp=drop_first)
    query, key = make_query()
    started = trio.current_time()
    answer = await PlainUpstream(server.spec, nursery).query(query, key)
    assert address_of(answer) == "192.0.2.1"
    # Sent at 0, again after 1 s, and after 2 s more: the same datagram each time.
    assert trio.current_time() - started == pytest.approx(3.0)
    assert len({data for data, _ in server.udp_queries}) == 1
    assert len({source for _, source in server.udp_queries}) == 1


async def test_silence_lasts_until_the_callers_deadline(
    start_plain: StartPlain, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    async def silent(server: FakePlainServer, query: bytes, source: Address) -> None:
        return None

    server = await start_plain(udp=silent)
    query, key = make_query()
    with trio.move_on_after(5) as scope:
        await PlainUpstream(server.spec, nursery).query(query, key)
    assert scope.cancelled_caught
    assert len(server.udp_queries) == 3  # at 0, 1 and 3 s (the next would be at 7)


async def test_a_query_that_gives_up_leaves_nothing_behind(
    start_plain: StartPlain, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    async def silent(server: FakePlainServer, query: bytes, source: Address) -> None:
        return None

    server = await start_plain(udp=silent)
    query, key = make_query()
    async with trio.open_nursery() as upstreams:
        upstream = PlainUpstream(server.spec, upstreams)
        for deadline in (0, 0.5, 1.0, 2.5):  # before the send, waiting, at a resend, later
            with trio.move_on_after(deadline):
                await upstream.query(query, key)
            await trio.testing.wait_all_tasks_blocked()
            assert upstreams.child_tasks == frozenset()


async def test_a_closed_port_is_a_connect_error(nursery: trio.Nursery) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    query, key = make_query()
    with pytest.raises(UpstreamConnectError, match=f"plain:127.0.0.1:{port}"):
        await PlainUpstream(PlainSpec("127.0.0.1", port), nursery).query(query, key)


async def test_tcp_closed_before_the_answer(start_plain: StartPlain, nursery: trio.Nursery) -> None:
    async def close_at_once(server: FakePlainServer, stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)

    server = await start_plain(udp=truncate, tcp=close_at_once)
    query, key = make_query()
    with pytest.raises(UpstreamClosed):
        await PlainUpstream(server.spec, nursery).query(query, key)


async def test_a_wrong_tcp_answer_is_a_protocol_error(
    start_plain: StartPlain, nursery: trio.Nursery
) -> None:
    async def wrong(server: FakePlainServer, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        decoder.feed(await stream.receive_some(65536))
        query = decoder.next_message()
        assert isinstance(query, bytes)
        await stream.send_all(frame(forged(query, name="www.example.org")))
        await stream.receive_some(65536)

    server = await start_plain(udp=truncate, tcp=wrong)
    query, key = make_query()
    with pytest.raises(UpstreamProtocolError, match="does not match"):
        await PlainUpstream(server.spec, nursery).query(query, key)


async def test_a_won_race_ends_the_wait_at_once(
    start_plain: StartPlain, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    async def silent(server: FakePlainServer, query: bytes, source: Address) -> None:
        return None

    server = await start_plain(udp=silent)
    upstream = PlainUpstream(server.spec, nursery)
    query, key = make_query()
    race = Race()

    async def win_elsewhere() -> None:
        await trio.sleep(0.5)
        race.answer = b"from another upstream"
        race.wake()

    nursery.start_soon(win_elsewhere)
    started = trio.current_time()
    with pytest.raises(RaceLost):
        await upstream.query(query, key, race)
    assert trio.current_time() - started == pytest.approx(0.5)
    with pytest.raises(RaceLost):
        await upstream.query(query, key, race)  # already won: not even sent
    assert len(server.udp_queries) == 1


async def test_a_race_it_wins(start_plain: StartPlain, nursery: trio.Nursery) -> None:
    server = await start_plain()
    query, key = make_query()
    answer = await PlainUpstream(server.spec, nursery).query(query, key, Race())
    assert address_of(answer) == "192.0.2.1"


async def test_ipv6_loopback(nursery: trio.Nursery) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    udp = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    await udp.bind(("::1", 0))
    port = udp.getsockname()[1]

    async def serve() -> None:
        with udp:
            data, source = await udp.recvfrom(65536)
            await udp.sendto(answer_for(data), source)

    nursery.start_soon(serve)
    query, key = make_query()
    spec = PlainSpec("::1", port)
    assert spec.label == f"plain:[::1]:{port}"
    assert address_of(await PlainUpstream(spec, nursery).query(query, key)) == "192.0.2.1"
