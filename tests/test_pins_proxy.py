"""SPKI pins through the whole proxy (RFC 7858 §4.2), against trustme fake upstreams.

A pin that does not match must cost the client a SERVFAIL and the upstream not one byte of the
query; a backup pin must work; pins alone must authenticate an upstream whose certificate no
CA or name would; pins and a name together require both.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.message
import dns.rcode
import trustme

from dot_proxy.core.pins import spki_sha256_b64
from tests.clients import query, udp_exchange
from tests.conftest import StartProxy, StartUpstream
from tests.fakes import FakeUpstream

OTHER_PIN = "A" * 43 + "="  # well formed, matches no key


@dataclass
class Spec:
    """Stands in for a FakeUpstream where start_proxy only needs ``spec``."""

    spec: str


def pin_of(upstream: FakeUpstream) -> str:
    return spki_sha256_b64(upstream.leaf_der)


async def ask(port: int) -> dns.message.Message:
    return dns.message.from_wire(await udp_exchange(port, query("pinned.test.").to_wire()))


async def test_the_right_pin_with_the_name_is_answered(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([Spec(f"{upstream.spec}^{pin_of(upstream)}")])
    assert (await ask(proxy.port)).rcode() == dns.rcode.NOERROR
    assert len(upstream.queries) == 1


async def test_a_wrong_pin_is_servfail_and_the_upstream_sees_no_query_bytes(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([Spec(f"{upstream.spec}^{OTHER_PIN}")])
    assert (await ask(proxy.port)).rcode() == dns.rcode.SERVFAIL
    assert upstream.handshakes >= 1  # TLS completed: the pin check refused it afterwards
    assert upstream.queries == []
    assert upstream.received_bytes == []


async def test_a_backup_pin_is_enough(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream()
    proxy = await start_proxy([Spec(f"{upstream.spec}^{OTHER_PIN}^{pin_of(upstream)}")])
    assert (await ask(proxy.port)).rcode() == dns.rcode.NOERROR


async def test_pins_alone_authenticate_an_upstream_no_ca_or_name_would(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # Issued by a CA the proxy does not trust, for a name that is not the address.
    upstream = await start_upstream(ca=trustme.CA(), names=("elsewhere.test",))
    proxy = await start_proxy([Spec(f"127.0.0.1:{upstream.port}^{pin_of(upstream)}")])
    assert (await ask(proxy.port)).rcode() == dns.rcode.NOERROR


async def test_pins_alone_with_a_wrong_pin_are_servfail(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    upstream = await start_upstream(ca=trustme.CA(), names=("elsewhere.test",))
    proxy = await start_proxy([Spec(f"127.0.0.1:{upstream.port}^{OTHER_PIN}")])
    assert (await ask(proxy.port)).rcode() == dns.rcode.SERVFAIL
    assert upstream.received_bytes == []


async def test_a_name_and_a_pin_both_must_match(
    start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # The right pin, but a certificate from an untrusted CA: the name check fails it.
    upstream = await start_upstream(ca=trustme.CA())
    proxy = await start_proxy([Spec(f"{upstream.spec}^{pin_of(upstream)}")])
    assert (await ask(proxy.port)).rcode() == dns.rcode.SERVFAIL
    assert upstream.received_bytes == []
