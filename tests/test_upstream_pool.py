"""The upstream pool at work: reuse, pipelining, one handshake for a crowd, growth, write batching.

These drive :class:`dot_proxy.upstream.Upstream` directly against the trustme fake upstream, and go
through the whole proxy where the client's view is the point (IDs restored). All run on virtual
time (the ``clock`` fixture), so nothing waits on the wall clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import dns.message
import dns.name
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy.core.framing import frame
from dot_proxy.core.message import message_id
from dot_proxy.upstream.pool import Upstream
from tests.clients import TcpClient, query, udp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import (
    Behaviour,
    Held,
    TlsWrite,
    UpstreamConnection,
    answer_for,
    ask,
    open_pool,
    record_tls_writes,
    spoiled_first,
)


def name(index: int) -> str:
    return f"q{index}.pool.test."


def address(index: int) -> str:
    return f"10.0.{index // 256}.{index % 256}"


def index_of(query_wire: bytes) -> int:
    label = dns.message.from_wire(query_wire).question[0].name.labels[0]
    return int(label[1:])


def own_answer(query_wire: bytes) -> bytes:
    """The answer to a ``name(i)`` query, carrying ``address(i)``: telling answers apart."""
    return answer_for(query_wire, address=address(index_of(query_wire)))


def answer_permuted(batch: int, order: str) -> Behaviour:
    """Collect ``batch`` queries, then answer them all at once (one write, one TLS record) in
    ``order``: "reverse" or "shuffled" (RFC 7766 §7: answers may come in any order)."""

    async def behaviour(connection: UpstreamConnection) -> None:
        queries: list[bytes] = []
        while len(queries) < batch:
            received = await connection.receive_query()
            if received is None:
                return
            queries.append(received)
        if order == "reverse":
            queries.reverse()
        else:
            random.Random(7766).shuffle(queries)
        assert [message_id(q) for q in queries] != sorted(message_id(q) for q in queries)
        await connection.stream.send_all(b"".join(frame(own_answer(q)) for q in queries))
        while (received := await connection.receive_query()) is not None:
            await connection.send(own_answer(received))

    return behaviour


def check_own_answer(answer: dns.message.Message, index: int) -> None:
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.question[0].name == dns.name.from_text(name(index))
    assert answer.answer[0][0].address == address(index)


async def test_sequential_queries_reuse_one_connection(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    fake = await start_upstream()
    async with open_pool(fake, ca_file) as [upstream]:
        for index in range(10):
            answer = await ask(upstream, name(index))
            assert answer.question[0].name == dns.name.from_text(name(index))
            assert len(upstream.connections) == 1
    assert (fake.connections, fake.handshakes) == (1, 1)
    assert len(fake.queries) == 10


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
async def test_pipelined_queries_get_distinct_ids_and_each_its_own_answer(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str, order: str
) -> None:
    count = 40
    fake = await start_upstream(answer_permuted(count, order))
    answers: dict[int, dns.message.Message] = {}

    async def one(index: int) -> None:
        # Every query carries the same ID: making them unique on the wire is the pool's job.
        answers[index] = await ask(upstream, name(index), msg_id=0x4242)

    async with open_pool(fake, ca_file) as [upstream]:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
        assert len(upstream.connections) == 1
    # All 40 were in flight on one connection at once (the fake answers none before the 40th).
    assert fake.handshakes == 1
    wire_ids = [message_id(q) for q in fake.queries]
    assert len(set(wire_ids)) == count  # RFC 7766 §6.2.1
    assert sorted(answers) == list(range(count))
    for index, answer in answers.items():
        check_own_answer(answer, index)


async def test_an_answer_to_another_question_under_the_right_id_is_not_delivered(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    def other_question(query_wire: bytes) -> bytes:
        impostor = query("impostor.test.")
        impostor.id = message_id(query_wire)
        return answer_for(impostor.to_wire(), address="203.0.113.66")

    fake = await start_upstream(spoiled_first(other_question, then_answer=True))
    async with open_pool(fake, ca_file) as [upstream]:
        for index in range(3):
            answer = await ask(upstream, name(index))
            assert answer.question[0].name == dns.name.from_text(name(index))
            assert answer.answer[0][0].address == "192.0.2.1"
        [connection] = upstream.connections
        assert not connection.closed
    assert fake.handshakes == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_proxy_restores_each_client_id_over_one_pipelined_connection(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    transport: str,
) -> None:
    count = 30
    fake = await start_upstream(answer_permuted(count, "reverse"))
    proxy = await start_proxy([fake])
    # Client IDs that collide with each other (over UDP, from different sockets) and with the
    # small IDs the pool picks on the wire.
    ids = [0x4242 if index % 2 else index for index in range(count)]
    if transport == "tcp":
        ids = list(range(count - 1, -1, -1))  # distinct on one TCP connection (RFC 7766 §6.2.1.1)
    requests = []
    for index in range(count):
        request = query(name(index))
        request.id = ids[index]
        requests.append(request)
    replies: dict[int, dns.message.Message] = {}

    async def over_udp(index: int) -> None:
        reply = await udp_exchange(proxy.port, requests[index].to_wire())
        replies[index] = dns.message.from_wire(reply)

    with trio.fail_after(30):
        if transport == "udp":
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    nursery.start_soon(over_udp, index)
        else:
            client = await TcpClient.connect(proxy.port)
            await client.send(*(r.to_wire() for r in requests))
            for _ in range(count):
                wire = await client.receive()
                assert wire is not None
                reply = dns.message.from_wire(wire)
                replies[ids.index(reply.id)] = reply
            await client.aclose()
    assert sorted(replies) == list(range(count))
    for index, reply in replies.items():
        assert reply.id == ids[index]
        check_own_answer(reply, index)
    assert fake.handshakes == 1
    assert len({message_id(q) for q in fake.queries}) == count


async def test_concurrent_first_queries_share_one_handshake(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    fake = await start_upstream()
    answers: dict[int, dns.message.Message] = {}

    async def one(index: int) -> None:
        answers[index] = await ask(upstream, name(index))

    async with open_pool(fake, ca_file) as [upstream]:
        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(one, index)
        assert len(upstream.connections) == 1
    assert (fake.connections, fake.handshakes) == (1, 1)
    assert sorted(answers) == list(range(50))
    for index, answer in answers.items():
        assert answer.question[0].name == dns.name.from_text(name(index))


async def test_a_full_connection_makes_the_pool_open_another(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    held = Held()
    fake = await start_upstream(held)
    answers: dict[int, dns.message.Message] = {}

    async def one(index: int) -> None:
        answers[index] = await ask(upstream, name(index))

    with trio.fail_after(30):
        async with (
            open_pool(fake, ca_file, max_pipeline=2) as [upstream],
            trio.open_nursery() as nursery,
        ):
            for index in range(3):
                nursery.start_soon(one, index)
            await fake.wait_for_queries(3)
            assert fake.handshakes == 2
            assert sorted(c.in_flight for c in upstream.connections) == [1, 2]
            await held.release()
    assert sorted(answers) == [0, 1, 2]


async def test_max_connections_bounds_the_pool_and_the_rest_wait_for_room(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    held = Held()
    fake = await start_upstream(held)
    answers: dict[int, dns.message.Message] = {}

    async def one(index: int) -> None:
        answers[index] = await ask(upstream, name(index))

    with trio.fail_after(30):
        async with (
            open_pool(fake, ca_file, max_pipeline=2, max_connections=2) as [upstream],
            trio.open_nursery() as nursery,
        ):
            for index in range(5):
                nursery.start_soon(one, index)
            await fake.wait_for_queries(4)
            await trio.testing.wait_all_tasks_blocked()
            # Two connections, both full; the fifth query waits for room, unsent.
            assert fake.handshakes == 2
            assert [c.in_flight for c in upstream.connections] == [2, 2]
            assert not answers
            # One answer makes room: the fifth goes out at once, on an existing connection.
            await held.release(1)
            await fake.wait_for_queries(5)
            assert fake.handshakes == 2
            await held.release()
    assert sorted(answers) == list(range(5))
    for index, answer in answers.items():
        assert answer.question[0].name == dns.name.from_text(name(index))
    assert fake.handshakes == 2


def client_writes_between(writes: list[TlsWrite], start: int) -> Iterator[int]:
    return (w.size for w in writes[start:] if not w.server_side)


@pytest.mark.parametrize("warm", [True, False], ids=["warm-pool", "cold-pool"])
async def test_a_burst_of_queries_leaves_in_very_few_writes(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
    warm: bool,
) -> None:
    writes = record_tls_writes(monkeypatch)
    fake = await start_upstream()
    burst = 50
    async with open_pool(fake, ca_file) as [upstream]:
        if warm:
            await ask(upstream, "warm.pool.test.")
        first_write, first_chunk = len(writes), len(fake.received_bytes)
        async with trio.open_nursery() as nursery:
            for index in range(burst):
                nursery.start_soon(ask, upstream, name(index))
        sizes = list(client_writes_between(writes, first_write))
        chunks = len(fake.received_bytes) - first_chunk
    assert len(fake.queries) == burst + warm
    # Queries started in one scheduling batch are queued together and leave in one send_all
    # (one TLS record); the cold pool may split them around the writer's first run. On a
    # quiet connection the first goes at once, alone (BatchWriter.send_alone), the rest after.
    assert len(sizes) <= (2 if warm else 3), sizes
    assert sum(sizes) >= burst * len(query(name(0)).to_wire())
    # The fake, reading 64 KiB at a time, gets them in as few chunks.
    assert chunks <= 3, chunks


class _TaskSteps(trio.abc.Instrument):
    """Counts task steps: the scheduling work the proxy does."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_freed_slot_wakes_one_waiting_query_not_all_of_them(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    # Under overload (an upstream froze and the pool filled) hundreds of queries wait for
    # room. Waking all of them for every freed slot costs each answer a wake-up per waiting
    # query, and the proxy never catches up (found by the soak). Each slot must wake one, in
    # arrival order, so the work per answered query stays the same however many wait.
    steps_per_query = []
    for waiting in (50, 200):
        held = Held()
        fake = await start_upstream(held)
        order: list[int] = []

        async def one(index: int, upstream: Upstream, order: list[int]) -> None:
            await ask(upstream, name(index))
            order.append(index)

        with trio.fail_after(60):
            async with (
                open_pool(fake, ca_file, max_pipeline=2, max_connections=1) as [upstream],
                trio.open_nursery() as nursery,
            ):
                for index in range(waiting + 2):
                    nursery.start_soon(one, index, upstream, order)
                    await trio.testing.wait_all_tasks_blocked()
                await fake.wait_for_queries(2)
                counter = _TaskSteps()
                trio.lowlevel.add_instrument(counter)
                try:
                    while len(order) < waiting + 2:
                        await held.release(1)
                        await fake.wait_for_queries(min(len(order) + 3, waiting + 2))
                        await trio.testing.wait_all_tasks_blocked()
                finally:
                    trio.lowlevel.remove_instrument(counter)
                await held.release()
        assert sorted(order) == list(range(waiting + 2))
        assert order[:waiting] == sorted(order[:waiting])  # first come, first served
        steps_per_query.append(counter.steps / (waiting + 2))
    # Four times the waiting queries, about the same work each (not four times as much).
    assert steps_per_query[1] < 1.5 * steps_per_query[0], steps_per_query
