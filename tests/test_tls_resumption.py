"""TLS session resumption (upstream/tls.py TLSSessions) against a trustme fake upstream."""

from __future__ import annotations

import dataclasses
import ssl
from typing import Any

import dns.message
import pytest
import trio
import trustme

from dot_proxy.config import UpstreamSpec, parse_upstream
from dot_proxy.core import pins
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.errors import UpstreamTLSError
from dot_proxy.upstream.tls import TLSSessions, make_ssl_context, open_tls
from tests.conftest import StartUpstream
from tests.fakes import AUTH_NAME, FakeUpstream, answer_for

QUERY = dns.message.make_query("www.example.com", "A").to_wire()


async def exchange(stream: trio.SSLStream[Any]) -> bytes:
    """One query and its answer: a TLS 1.3 client has its tickets once it has read."""
    await stream.send_all(frame(QUERY))
    decoder = FrameDecoder()
    while (answer := decoder.next_message()) is NEED_DATA:
        decoder.feed(await stream.receive_some(65536))
    assert isinstance(answer, bytes)
    return answer


async def connect(
    spec: UpstreamSpec, context: ssl.SSLContext, sessions: TLSSessions | None, *, talk: bool = True
) -> trio.SSLStream[Any]:
    stream = await open_tls(spec, context, sessions)
    if talk:
        await exchange(stream)
    return stream


@pytest.fixture
def context(ca_file: str) -> ssl.SSLContext:
    return make_ssl_context(ca_file=ca_file)


async def start(start_upstream: StartUpstream) -> tuple[FakeUpstream, UpstreamSpec]:
    # The fake notes whether each handshake resumed a session (FakeUpstream.session_reused).
    upstream = await start_upstream()
    return upstream, parse_upstream(upstream.spec)


async def test_a_reconnection_resumes_the_session(
    start_upstream: StartUpstream, context: ssl.SSLContext
) -> None:
    upstream, spec = await start(start_upstream)
    sessions = TLSSessions()
    for _ in range(3):
        stream = await connect(spec, context, sessions)
        assert stream.version() == "TLSv1.3"
        await stream.aclose()
    assert upstream.session_reused == [False, True, True]
    assert upstream.handshakes == 3


async def test_without_a_store_nothing_is_resumed(
    start_upstream: StartUpstream, context: ssl.SSLContext
) -> None:
    upstream, spec = await start(start_upstream)
    for _ in range(2):
        await (await connect(spec, context, None)).aclose()
    assert upstream.session_reused == [False, False]


async def test_tls12_session_ids_resume(
    ca: trustme.CA, ca_file: str, nursery: trio.Nursery
) -> None:
    # A server that keeps TLS 1.2 sessions in its cache by ID (no tickets). OpenSSL drops a
    # cached session whose connection it did not close cleanly, so this one answers one
    # query and closes with close_notify, as a server closing an idle connection does.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(AUTH_NAME).configure_cert(server_context)
    server_context.options |= ssl.OP_NO_TICKET
    reused: list[bool] = []

    async def serve_one(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        try:
            await stream.do_handshake()
            reused.append(stream.session_reused)
            decoder = FrameDecoder()
            while (query := decoder.next_message()) is NEED_DATA:
                decoder.feed(await stream.receive_some(65536))
            assert isinstance(query, bytes)
            await stream.send_all(frame(answer_for(query)))
            await stream.aclose()
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, serve_one, listeners)
    spec = parse_upstream(f"127.0.0.1:{port}#{AUTH_NAME}")
    context = make_ssl_context(ca_file=ca_file)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    sessions = TLSSessions()
    for _ in range(3):
        stream = await connect(spec, context, sessions)
        assert stream.version() == "TLSv1.2"
        assert not stream.session.has_ticket
        await stream.aclose()
    assert reused == [False, True, True]


async def test_a_ticket_is_offered_once(
    start_upstream: StartUpstream, context: ssl.SSLContext
) -> None:
    upstream, spec = await start(start_upstream)
    sessions = TLSSessions()
    first = await connect(spec, context, sessions)
    # The second resumes the first's ticket; until it has read its own, a third gets none:
    # RFC 8446 §C.4, a ticket used twice links the two connections for an observer.
    second = await connect(spec, context, sessions, talk=False)
    third = await connect(spec, context, sessions)
    assert upstream.session_reused == [False, True, False]
    # Two connections opening at once: one resumes, the other makes a full handshake.
    opened: list[trio.SSLStream[Any]] = []

    async def open_one() -> None:
        opened.append(await connect(spec, context, sessions))

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(open_one)
    assert sorted(upstream.session_reused[3:]) == [False, True]
    for stream in (first, second, third, *opened):
        await stream.aclose()


async def test_sessions_are_offered_only_to_the_same_upstream(
    start_upstream: StartUpstream, context: ssl.SSLContext, ca_file: str
) -> None:
    upstream, spec = await start(start_upstream)
    sessions = TLSSessions()
    await (await connect(spec, context, sessions)).aclose()
    # The fake's certificate also names 127.0.0.1: the same server under another auth name,
    # another pin set, or another context is a different upstream.
    by_address = parse_upstream(f"127.0.0.1:{upstream.port}")
    pin = pins.spki_sha256_b64(upstream.leaf_der)
    pinned = dataclasses.replace(spec, pins=(pin,))
    for other, other_context in [
        (by_address, context),
        (pinned, context),
        (spec, make_ssl_context(ca_file=ca_file)),
    ]:
        await (await connect(other, other_context, sessions)).aclose()
    assert upstream.session_reused == [False, False, False, False]
    assert len(sessions) == 4
    # Each resumes its own next time, the pinned one with its pin checked again.
    await (await connect(pinned, context, sessions)).aclose()
    await (await connect(by_address, context, sessions)).aclose()
    assert upstream.session_reused[-2:] == [True, True]


async def test_a_resumed_handshake_still_checks_the_pins(
    start_upstream: StartUpstream, context: ssl.SSLContext
) -> None:
    upstream, spec = await start(start_upstream)
    pinned = dataclasses.replace(spec, pins=(pins.spki_sha256_b64(upstream.leaf_der),))
    sessions = TLSSessions()
    await (await connect(pinned, context, sessions)).aclose()
    stream = await connect(pinned, context, sessions)
    assert stream.session_reused
    assert stream.getpeercert(binary_form=True) == upstream.leaf_der
    await stream.aclose()
    # A session for this upstream, offered with pins that do not match, fails the handshake.
    wrong = dataclasses.replace(pinned, pins=("A" * 43 + "=",))
    sessions._sources[(*_key(wrong), context)] = sessions._sources.pop((*_key(pinned), context))
    with pytest.raises(UpstreamTLSError, match="matches none of the configured pins"):
        await open_tls(wrong, context, sessions)
    assert upstream.session_reused[-1] is True
    assert len(sessions) == 0  # a failed handshake leaves nothing to offer


def _key(spec: UpstreamSpec) -> tuple[object, ...]:
    return (spec.host, spec.port, spec.auth_name, spec.pins, spec.check_name)
