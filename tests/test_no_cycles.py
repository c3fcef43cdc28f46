"""Answering queries leaves no reference cycles behind.

The proxy runs with a large youngest generation for the cyclic collector
(``cli.GC_YOUNG_THRESHOLD``) because everything a query allocates is freed by reference
counting when it is answered; a cycle made per query would pile up until the next pass instead.
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Iterator

import pytest
import trio

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


@pytest.mark.parametrize("upstreams", [1, 2], ids=["one-upstream", "two-upstreams-racing"])
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

    async with trio.open_nursery() as nursery:
        for wire in wires:
            nursery.start_soon(udp_exchange, proxy.port, wire)
    await client.send(*wires)  # pipelined: in flight together on one connection
    for _ in wires:
        assert await client.receive() is not None
    gc.collect()
    assert _summary(saved_garbage) == ""
    await client.aclose()
