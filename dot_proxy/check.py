"""``dot-proxy check``: what a user runs when resolution breaks.

For each upstream: connect and authenticate exactly as the proxy would, then print the TLS
version, the names in the certificate, the SPKI pin of the key it presented, whether the name
and the pins match, and the round-trip time of a test query. Exit status 1 if any fails.

An upstream passes when it answers the test query NOERROR or NXDOMAIN: it resolved it. A
REFUSED means the resolver is reached and authenticated but will not resolve for us (an
access list on its side, or a resolver that serves only its own zones), and a SERVFAIL that it
could not resolve it: the proxy would get the same answer for its clients' queries and could
only pass it on, so both fail the check, each with what it means. ``--query NAME`` asks a name
the upstream does serve, for a resolver of a few zones.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from dot_proxy.config import Config, UpstreamSpec
from dot_proxy.core import pins
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.core.message import message_id, rcode_name
from dot_proxy.errors import ConfigError, UpstreamError
from dot_proxy.upstream.socket_stream import EagerSocketStream
from dot_proxy.upstream.tls import make_ssl_context, open_tls, quickack_hook

__all__ = ["make_test_query", "run_check"]

# ". IN NS", ID 0x5ca1, RD set: the priming query every recursive resolver answers.
TEST_QUERY = bytes.fromhex("5ca1 0100 0001 0000 0000 0000 00 0002 0001")
_QUERY_HEADER = bytes.fromhex("5ca1 0100 0001 0000 0000 0000")
_TYPE_A_CLASS_IN = bytes.fromhex("0001 0001")
# The answers that show the upstream resolves for us; NXDOMAIN is an answer too.
RESOLVED = ("NOERROR", "NXDOMAIN")
WHY_NOT = {
    "REFUSED": "the upstream is reached and authenticated but will not resolve this for us "
    "(an access list on its side, or it serves only its own zones: try --query with a name "
    "it serves); the proxy would pass REFUSED on to its clients",
    "SERVFAIL": "the upstream could not resolve it (its own upstreams, or DNSSEC "
    "validation, failed); the proxy would pass SERVFAIL on to its clients",
}

Print = Callable[[str], None]


def make_test_query(name: str) -> bytes:
    """The test query for ``name``: ``.`` asks the root's NS records, any other name its A.

    Error handling: raises :class:`ConfigError` (``--query``) for a name that is not one.
    """
    labels = name.strip().rstrip(".").split(".") if name.strip() != "." else []
    try:
        encoded = [label.encode("ascii") for label in labels]
    except UnicodeEncodeError:
        raise ConfigError(f"--query: {name!r} is not an ASCII name (give its A-label)") from None
    wire = b"".join(bytes([len(label)]) + label for label in encoded) + b"\x00"
    if any(not 0 < len(label) < 64 for label in encoded) or len(wire) > 255:
        raise ConfigError(f"--query: {name!r} is not a domain name")
    if not labels:
        return TEST_QUERY
    return _QUERY_HEADER + wire + _TYPE_A_CLASS_IN


def _question_text(query: bytes) -> str:
    return ". NS" if query == TEST_QUERY else f"{_name_text(query)} A"


def _name_text(query: bytes) -> str:
    labels, offset = [], 12
    while length := query[offset]:
        labels.append(query[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    return ".".join(labels)


async def run_check(config: Config, *, query: bytes = TEST_QUERY, out: Print = print) -> int:
    """Check every upstream in ``config`` with ``query``; 0 if all passed, else 1."""
    failures = 0
    for spec in config.upstreams:
        out(spec.description)
        with trio.move_on_after(config.timeout) as scope:
            ok = await _check_one(spec, config, query, out)
        if scope.cancelled_caught:
            out(f"  FAILED: no answer within {config.timeout:g} s")
            ok = False
        failures += not ok
    return 1 if failures else 0


async def _check_one(spec: UpstreamSpec, config: Config, query: bytes, out: Print) -> bool:
    context = make_ssl_context(
        ca_file=config.ca_file, ca_data=config.ca_data, pins_only=not spec.check_name
    )
    try:
        stream = await open_tls(spec, context)
    except UpstreamError as exc:
        out(f"  FAILED: {exc}")
        await _show_presented_key(spec, config, out)
        return False
    try:
        _describe_tls(spec, stream, out)
        started = trio.current_time()
        rcode = await _ask(stream, query)
        elapsed = (trio.current_time() - started) * 1000
        out(f"  query:   {_question_text(query)} answered {rcode} in {elapsed:.1f} ms")
    except (trio.BrokenResourceError, trio.ClosedResourceError, UpstreamError) as exc:
        out(f"  FAILED: the test query got no answer: {exc}")
        return False
    finally:
        await trio.aclose_forcefully(stream)
    if rcode not in RESOLVED:
        out(f"  FAILED: {rcode}: {WHY_NOT.get(rcode, 'the test query was not resolved')}")
        return False
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
    inspect = make_ssl_context(ca_file=config.ca_file, ca_data=config.ca_data, pins_only=True)
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


async def _ask(stream: trio.SSLStream[EagerSocketStream], query: bytes) -> str:
    await stream.send_all(frame(query))
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
            return rcode_name(answer)
