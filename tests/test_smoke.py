"""The shortest path through the proxy, over UDP and TCP."""

from __future__ import annotations

import dns.message

from tests.clients import query, tcp_exchange, udp_exchange
from tests.conftest import StartProxy, StartUpstream


async def test_udp_and_tcp_answers(start_upstream: StartUpstream, start_proxy: StartProxy) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([upstream])
    request = query("example.com.", "A")
    for exchange in (udp_exchange, tcp_exchange):
        reply = await exchange(proxy.port, request.to_wire())
        assert reply is not None
        answer = dns.message.from_wire(reply)
        assert answer.id == request.id
        assert str(answer.answer[0][0]) == "192.0.2.1"
    assert upstream.handshakes == 1  # the second query reused the connection
