"""Cancelling a query at every await point of the pool's query path.

The path of ``Upstream.query``: wait for room in the pool, wait for a connecting connection's
handshake, wait for the answer. A cancel at any of them (the client's deadline, a server
shutting down) must leave the connection healthy: no new handshake for the next query, and
the other queries in flight on it unaffected. Query tasks never write to the TLS stream (a
writer task per connection does), so a cancel can never cut a write in half.
"""

from __future__ import annotations

import dns.message
import dns.name
import pytest
import trio
import trio.testing
import trustme

from dot_proxy.upstream.pool import Upstream
from tests.conftest import StartUpstream
from tests.fakes import (
    FakeUpstream,
    Held,
    answer_after,
    ask,
    open_pool,
    record_tls_writes,
)


def name(label: str) -> str:
    return f"{label}.cancel.test."


def names_asked(fake: FakeUpstream) -> list[str]:
    return [dns.message.from_wire(q).question[0].name.to_text() for q in fake.queries]


def check(answer: dns.message.Message, label: str) -> None:
    assert answer.question[0].name == dns.name.from_text(name(label))
    assert answer.answer[0][0].address == "192.0.2.1"


class GatedHandshake(FakeUpstream):
    """A fake that accepts TCP at once but starts TLS only when the test opens ``gate``."""

    def __init__(self, ca: trustme.CA) -> None:
        super().__init__(ca)
        self.accepted = trio.Event()
        self.gate = trio.Event()
        self.tcp_connections = 0

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.tcp_connections += 1
        self.accepted.set()
        await self.gate.wait()
        await super()._handle(tcp)


async def cancellable(
    upstream: Upstream, label: str, scope: trio.CancelScope, answers: dict[str, object]
) -> None:
    with scope:
        answers[label] = await ask(upstream, name(label))


async def keep(upstream: Upstream, label: str, answers: dict[str, object]) -> None:
    answers[label] = await ask(upstream, name(label))


async def test_cancel_while_waiting_for_the_handshake(
    clock: trio.testing.MockClock, ca: trustme.CA, ca_file: str, nursery: trio.Nursery
) -> None:
    fake = GatedHandshake(ca)
    await nursery.start(fake.serve)
    answers: dict[str, object] = {}
    scope = trio.CancelScope()
    with trio.fail_after(30):
        async with open_pool(fake, ca_file) as [upstream]:
            async with trio.open_nursery() as queries:
                queries.start_soon(cancellable, upstream, "cancelled", scope, answers)
                queries.start_soon(keep, upstream, "other", answers)
                await fake.accepted.wait()
                await trio.testing.wait_all_tasks_blocked()
                [connection] = upstream.connections
                assert not connection.ready.is_set()  # both queries wait for its handshake
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                fake.gate.set()
            assert scope.cancelled_caught
            assert "cancelled" not in answers
            check(answers["other"], "other")  # type: ignore[arg-type]
            # The handshake the cancelled query was waiting for completed and is reused.
            check(await ask(upstream, name("after")), "after")
            assert upstream.connections == (connection,)
    assert (fake.tcp_connections, fake.handshakes) == (1, 1)
    assert names_asked(fake) == [name("other"), name("after")]


async def test_cancel_the_only_query_waiting_for_a_handshake(
    clock: trio.testing.MockClock, ca: trustme.CA, ca_file: str, nursery: trio.Nursery
) -> None:
    fake = GatedHandshake(ca)
    await nursery.start(fake.serve)
    with trio.fail_after(30):
        async with open_pool(fake, ca_file) as [upstream]:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as queries:
                    queries.start_soon(ask, upstream, name("cancelled"))
                    await fake.accepted.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            fake.gate.set()
            check(await ask(upstream, name("after")), "after")
            assert len(upstream.connections) == 1
    assert (fake.tcp_connections, fake.handshakes) == (1, 1)
    assert names_asked(fake) == [name("after")]


async def test_cancel_while_waiting_for_the_answer(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    held = Held()
    fake = await start_upstream(held)
    answers: dict[str, object] = {}
    scope = trio.CancelScope()
    with trio.fail_after(30):
        async with open_pool(fake, ca_file) as [upstream]:
            async with trio.open_nursery() as queries:
                queries.start_soon(cancellable, upstream, "cancelled", scope, answers)
                queries.start_soon(keep, upstream, "other", answers)
                await fake.wait_for_queries(2)
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                [connection] = upstream.connections
                assert not connection.closed
                assert connection.in_flight == 2  # the cancelled query's ID stays reserved
                await held.release()  # both answers, the cancelled one's first
            assert scope.cancelled_caught
            assert "cancelled" not in answers
            check(answers["other"], "other")  # type: ignore[arg-type]
            assert connection.in_flight == 0
            async with trio.open_nursery() as queries:
                queries.start_soon(keep, upstream, "after", answers)
                await fake.wait_for_queries(3)
                await held.release()
            check(answers["after"], "after")  # type: ignore[arg-type]
            assert upstream.connections == (connection,)
            assert not connection.closed
    assert fake.handshakes == 1


async def test_cancel_while_waiting_for_room_in_the_pool(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, ca_file: str
) -> None:
    held = Held()
    fake = await start_upstream(held)
    answers: dict[str, object] = {}
    scope = trio.CancelScope()
    with trio.fail_after(30):
        async with open_pool(fake, ca_file, max_connections=1, max_pipeline=1) as [upstream]:
            async with trio.open_nursery() as queries:
                queries.start_soon(keep, upstream, "first", answers)
                await fake.wait_for_queries(1)
                queries.start_soon(cancellable, upstream, "cancelled", scope, answers)
                await trio.testing.wait_all_tasks_blocked()
                [connection] = upstream.connections
                assert connection.in_flight == 1  # the second query waits for room, unsent
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                await held.release()
            assert scope.cancelled_caught
            check(answers["first"], "first")  # type: ignore[arg-type]
            # The room the cancelled query gave up is there for the next one.
            async with trio.open_nursery() as queries:
                queries.start_soon(keep, upstream, "after", answers)
                await fake.wait_for_queries(2)
                await held.release()
            check(answers["after"], "after")  # type: ignore[arg-type]
            assert upstream.connections == (connection,)
    assert fake.handshakes == 1
    assert names_asked(fake) == [name("first"), name("after")]


async def test_query_tasks_never_await_a_write_to_the_tls_stream(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel cannot cut a write in half because no query task awaits one: the connection's
    writer task sends what queues up, and a query alone on a quiet connection is sent by its
    own task in one call without an await (EagerSender.send_nowait), whatever the query tasks
    do (complete, or get cancelled at any point)."""
    writes = record_tls_writes(monkeypatch)
    fake = await start_upstream(answer_after(0.05))
    query_tasks: set[trio.lowlevel.Task] = set()
    answered: list[str] = []

    async def one(index: int, cancel_after: float | None) -> None:
        query_tasks.add(trio.lowlevel.current_task())
        with trio.move_on_after(float("inf") if cancel_after is None else cancel_after):
            answer = await ask(upstream, name(f"q{index}"))
            answered.append(answer.question[0].name.to_text())

    with trio.fail_after(30):
        async with open_pool(fake, ca_file, max_pipeline=8) as [upstream]:
            async with trio.open_nursery() as queries:
                # Some cancelled at once (before the handshake completes), some while their
                # answer is on its way, the others not at all; on several connections.
                for index in range(40):
                    cancel_after = (None, 0.0, 0.01)[index % 3]
                    queries.start_soon(one, index, cancel_after)
            # Then one at a time, each alone on a quiet connection once the answers to the
            # cancelled ones are in.
            for index in range(40, 52):
                await one(index, (None, 0.0, 0.01)[index % 3])
                await trio.sleep(1)
    client_writes = [w for w in writes if not w.server_side]
    writers = {w.task for w in client_writes if not w.eager}
    assert writers, "the test saw no writes"
    assert not writers & query_tasks  # no query task ever awaited send_all
    assert len(writers) == fake.handshakes  # one writer per connection
    eager_by_queries = [w for w in client_writes if w.eager and w.task in query_tasks]
    assert eager_by_queries, "no query was sent by its own task"
    assert len(answered) == len([i for i in range(52) if i % 3 == 0])
