"""``dot-proxy check``: what a user runs when resolution breaks.

For each upstream: connect and authenticate exactly as the proxy would, then print the TLS
version, the names in the certificate, the SPKI pin of the key it presented, whether the name
and the pins match, and the round-trip time of a test query. Exit status 1 if any fails.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from dot_proxy.config import Config, UpstreamSpec
from dot_proxy.core import pins
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.core.message import message_id
from dot_proxy.errors import UpstreamError
from dot_proxy.upstream.socket_stream import EagerSocketStream
from dot_proxy.upstream.tls import make_ssl_context, open_tls, quickack_hook

__all__ = ["run_check"]

# ". IN NS", ID 0x5ca1, RD set: any answer, even REFUSED, shows the resolver works.
TEST_QUERY = bytes.fromhex("5ca1 0100 0001 0000 0000 0000 00 0002 0001")
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")

Print = Callable[[str], None]


async def run_check(config: Config, *, out: Print = print) -> int:
    """Check every upstream in ``config``; 0 if all passed, else 1."""
    failures = 0
    for spec in config.upstreams:
        out(spec.label + (f" ^{len(spec.pins)} pin(s)" if spec.pins else ""))
        with trio.move_on_after(config.timeout) as scope:
            ok = await _check_one(spec, config, out)
        if scope.cancelled_caught:
            out(f"  FAILED: no answer within {config.timeout:g} s")
            ok = False
        failures += not ok
    return 1 if failures else 0


async def _check_one(spec: UpstreamSpec, config: Config, out: Print) -> bool:
    context = make_ssl_context(ca_file=config.ca_file, pins_only=not spec.check_name)
    try:
        stream = await open_tls(spec, context)
    except UpstreamError as exc:
        out(f"  FAILED: {exc}")
        await _show_presented_key(spec, config, out)
        return False
    try:
        _describe_tls(spec, stream, out)
        started = trio.current_time()
        rcode = await _test_query(stream)
        elapsed = (trio.current_time() - started) * 1000
        out(f"  query:   . NS answered {rcode} in {elapsed:.1f} ms")
    except (trio.BrokenResourceError, trio.ClosedResourceError, UpstreamError) as exc:
        out(f"  FAILED: the test query got no answer: {exc}")
        return False
    finally:
        await trio.aclose_forcefully(stream)
    out("  OK")
    return True


def _describe_tls(
    spec: UpstreamSpec, stream: trio.SSLStream[EagerSocketStream], out: Print
) -> None:
    cipher = stream.cipher()
    alpn = stream.selected_alpn_protocol() or "none"
    out(f"  TLS:     {stream.version()}, {cipher[0] if cipher else '?'}, ALPN {alpn}")
    names = _certificate_names(stream.getpeercert())
    out(f"  names:   {', '.join(names) if names else '(not read: authenticated by pins only)'}")
    leaf = stream.getpeercert(binary_form=True)
    if leaf is not None:
        out(f"  pin:     {pins.spki_sha256_b64(leaf)}  (SPKI SHA-256 of the presented key)")
    if spec.check_name:
        out(f"  name:    certificate valid for {spec.auth_name}")
    out(f"  pins:    {'match' if spec.pins else 'none configured'}")


def _certificate_names(peer: object) -> list[str]:
    if not isinstance(peer, dict):
        return []
    return [value for _kind, value in peer.get("subjectAltName", ())]


async def _show_presented_key(spec: UpstreamSpec, config: Config, out: Print) -> None:
    # Reconnect without checking anything, only to show what the server presents: the pin a
    # user would add, or the sign that a middlebox is intercepting.
    inspect = make_ssl_context(ca_file=config.ca_file, pins_only=True)
    unpinned = UpstreamSpec(spec.host, spec.port, spec.auth_name, (), check_name=False)
    try:
        stream = await open_tls(unpinned, inspect)
    except UpstreamError:
        return
    try:
        leaf = stream.getpeercert(binary_form=True)
        if leaf is not None:
            out(f"  presented key pin: {pins.spki_sha256_b64(leaf)}")
    finally:
        await trio.aclose_forcefully(stream)


async def _test_query(stream: trio.SSLStream[EagerSocketStream]) -> str:
    await stream.send_all(frame(TEST_QUERY))
    quickack = quickack_hook(stream)  # the proxy does the same; see tls.py
    if quickack is not None:
        quickack()
    decoder = FrameDecoder()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("the upstream closed the connection")
        decoder.feed(data)
        answer = decoder.next_message()
        if answer is not NEED_DATA and len(answer) >= 4 and message_id(answer) == 0x5CA1:
            rcode = answer[3] & 0x0F
            return RCODES[rcode] if rcode < len(RCODES) else f"rcode {rcode}"
