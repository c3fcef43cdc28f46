"""The trio internals the upstream side relies on are there, with their types, on this trio.

``dot_proxy.upstream.trio_private`` reads three private attributes of ``trio.SSLStream`` to
save scheduling rounds. Without them the proxy still works, a round slower per write and per
record, and says so once at start: a trio that renamed one must fail here, loudly, rather than
pass every other test on the slow path. Covered: every attribute is present with its type, on
a throwaway stream and on a real client stream over a socket; the shortcuts are live on that
stream; one missing attribute is named by ``missing_internals``, makes both shortcuts step
aside, and is logged once when the upstreams open.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trustme

from dot_proxy.config import Config, parse_upstream
from dot_proxy.upstream.pool import open_upstreams
from dot_proxy.upstream.socket_stream import EagerSocketStream
from dot_proxy.upstream.trio_private import (
    INTERNALS,
    missing_internals,
    round_saving_drain,
    round_saving_sender,
)
from tests.fakes import tls_pair

TLS = trio.SSLStream[Any]


@pytest.fixture
async def client(ca: trustme.CA) -> AsyncIterator[TLS]:
    """A client SSLStream over an EagerSocketStream, handshake done (as the proxy's are)."""
    left, right = socket.socketpair()
    client, server = await tls_pair(ca, EagerSocketStream(left), EagerSocketStream(right))
    yield client
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


def test_this_trio_has_every_internal_the_upstream_side_relies_on() -> None:
    assert missing_internals() == [], f"trio {trio.__version__}: update trio_private.py"


@pytest.mark.parametrize(("name", "kind"), INTERNALS.items(), ids=list(INTERNALS))
async def test_a_real_client_stream_has_it_with_its_type(
    client: TLS, name: str, kind: type
) -> None:
    assert isinstance(getattr(client, name, None), kind), f"trio {trio.__version__}"


async def test_both_shortcuts_are_live_on_a_real_client_stream(client: TLS) -> None:
    assert round_saving_sender(client) is not None
    assert round_saving_drain(client) is not bytes


def _without_outgoing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every SSLStream built from now on lack ``_outgoing``, as a future trio might."""
    init = trio.SSLStream.__init__

    def init_without(self: TLS, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        del self._outgoing

    monkeypatch.setattr(trio.SSLStream, "__init__", init_without)


def test_a_missing_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_outgoing(monkeypatch)
    assert missing_internals() == ["SSLStream._outgoing is nothing, not MemoryBIO"]


async def test_a_stream_missing_one_takes_the_public_path(client: TLS) -> None:
    del client._outgoing
    assert round_saving_sender(client) is None
    client._ssl_object = "renamed"
    assert round_saving_drain(client) is bytes  # always b"": one record per receive_some


async def test_a_missing_attribute_is_logged_once_when_the_upstreams_open(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _without_outgoing(monkeypatch)
    config = Config(upstreams=(parse_upstream("127.0.0.1:853#dns.test"),))
    with caplog.at_level(logging.WARNING, logger="dot_proxy"):
        async with open_upstreams(config):
            pass
    [record] = [r for r in caplog.records if "trio" in r.getMessage()]
    assert "SSLStream._outgoing is nothing, not MemoryBIO" in record.getMessage()
    assert "public path" in record.getMessage()
