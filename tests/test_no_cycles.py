"""Answering queries leaves no reference cycles behind, and failing them none of ours.

The proxy runs with a large youngest generation for the cyclic collector
(``cli.GC_THRESHOLDS``) because everything a query allocates is freed by reference
counting when it is answered; a cycle made per query would pile up until the next pass instead.
A failed query's exception must not hold frames that hold it (``errors.fresh``); what is left
is trio's own, one cycle per TLS stream (``SSLStream._handshook``), not per query.
"""

from __future__ import annotations

import collections
import gc
import types
from collections.abc import Callable, Iterator

import pytest
import trio

from dot_proxy.errors import UpstreamClosed, fresh
from dot_proxy.upstream.socket_stream import EagerSocketStream
from tests import fakes
from tests.clients import TcpClient, query, udp_exchange
from tests.conftest import StartProxy, StartUpstream

QUERIES = 40  # per transport; enough that a cycle per query could not hide among the noise


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """Cycles found unreachable while the test body runs, kept instead of freed."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _summary(garbage: list[object]) -> str:
    kinds = collections.Counter(type(thing).__qualname__ for thing in garbage)
    return ", ".join(f"{count} {kind}" for kind, count in kinds.most_common(10))


@pytest.mark.parametrize("upstreams", [1, 2], ids=["one-upstream", "two-upstreams"])
async def test_answered_queries_leave_no_cycles(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    saved_garbage: list[object],
    upstreams: int,
) -> None:
    proxy = await start_proxy([await start_upstream() for _ in range(upstreams)])
    client = await TcpClient.connect(proxy.port)
    wires = [query(f"name{index}.example.", "A").to_wire() for index in range(QUERIES)]
    # Warm: the pool's connection, the client's connection, every lazily built thing.
    assert await udp_exchange(proxy.port, wires[0]) is not None
    await client.send(wires[0])
    assert await client.receive() is not None
    gc.collect()
    saved_garbage.clear()

    udp_answers: list[bytes] = []

    async def ask(wire: bytes) -> None:
        udp_answers.append(await udp_exchange(proxy.port, wire))

    async with trio.open_nursery() as nursery:
        for wire in wires:
            nursery.start_soon(ask, wire)
    await client.send(*wires)  # pipelined: in flight together on one connection
    tcp_answers = [await client.receive() for _ in wires]
    assert len(udp_answers) == QUERIES
    assert None not in tcp_answers
    gc.collect()
    assert _summary(saved_garbage) == ""
    await client.aclose()


def _ours(thing: object) -> bool:
    """Whether ``thing`` is dot-proxy's: its object, exception, or a frame of its code.

    Not the EagerSocketStream under a closed TLS stream: trio's cycle holds it.
    """
    if isinstance(thing, types.FrameType):
        where = thing.f_code.co_filename
    elif isinstance(thing, types.CoroutineType):
        where = thing.cr_code.co_filename
    elif isinstance(thing, types.TracebackType):
        where = thing.tb_frame.f_code.co_filename
    elif isinstance(thing, EagerSocketStream):
        return False
    else:
        where = type(thing).__module__
    return "dot_proxy" in where


@pytest.mark.parametrize(
    "behaviour",
    [fakes.close_after(1), fakes.hang, fakes.garbage_after(1)],
    ids=["connection-closed", "no-answer-timeout", "garbage-answer"],
)
async def test_failed_queries_leave_no_cycles_of_ours(
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    saved_garbage: list[object],
    behaviour: Callable[[fakes.UpstreamConnection], object],
) -> None:
    proxy = await start_proxy([await start_upstream(behaviour)], timeout=0.5)
    wires = [query(f"name{index}.example.", "A").to_wire() for index in range(QUERIES // 2)]
    await udp_exchange(proxy.port, wires[0])  # the first failure, and whatever set-up left
    gc.collect()
    saved_garbage.clear()

    async with trio.open_nursery() as nursery:
        for wire in wires:
            nursery.start_soon(udp_exchange, proxy.port, wire)  # SERVFAIL, each
    gc.collect()
    assert _summary([thing for thing in saved_garbage if _ours(thing)]) == ""


def test_fresh_copies_an_error_without_its_traceback_or_causes() -> None:
    try:
        try:
            raise OSError("reset")
        except OSError as cause:
            raise UpstreamClosed("dns.test: connection broke") from cause
    except UpstreamClosed as raised:
        error = raised
    copy = fresh(error)
    assert type(copy) is UpstreamClosed
    assert copy.args == error.args
    assert copy.__traceback__ is None
    assert copy.__cause__ is None
    assert copy.__context__ is None
