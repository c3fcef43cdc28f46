"""Opening an authenticated TLS connection to an upstream resolver (RFC 7858 §3.2, RFC 8310 §5).

The client context (CA, host name, TLS 1.2 at least, ALPN ``dot``), the handshake over a bare
non-blocking socket (:class:`~dot_proxy.upstream.socket_stream.EagerSocketStream`), the SPKI pin
check that comes before any byte is written (RFC 7858 §4.2), and TCP_QUICKACK. trio and ssl
exceptions are mapped to :mod:`dot_proxy.errors` here.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress

import trio

from dot_proxy.config import UpstreamSpec
from dot_proxy.core import pins
from dot_proxy.errors import UpstreamConnectError, UpstreamError, UpstreamTLSError
from dot_proxy.upstream.socket_stream import EagerSocketStream

__all__ = [
    "Connect",
    "check_pins",
    "make_ssl_context",
    "open_tls",
    "quickack_hook",
    "tls_connector",
]

# How a pool opens a connection to an upstream: an authenticated stream, ready for queries, or
# an UpstreamError. The proxy's is tls_connector's; tests and the fuzz harness pass their own.
Connect = Callable[[UpstreamSpec], Awaitable[trio.abc.Stream]]


def make_ssl_context(
    *, ca_file: str | None, ca_data: str | None = None, pins_only: bool = False
) -> ssl.SSLContext:
    """The client TLS context for upstreams (RFC 7858 §3.2, RFC 8310 §5 strict profile).

    System CAs, or only the PEM certificates ``ca_data`` (read from ``ca_file`` earlier) or
    ``ca_file`` when given; certificate and host name checked; TLS 1.2 at
    least; ALPN ``dot`` (RFC 7858 §3.1 does not require it, but servers that host several
    protocols on one port use it). ``pins_only`` is for upstreams authenticated by SPKI pins
    alone (RFC 7858 §4.2): the chain and name go unchecked because the pin check after the
    handshake, which nothing skips, is the authentication.
    """
    if ca_data is not None:
        context = ssl.create_default_context(cadata=ca_data)
    else:
        context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["dot"])
    if pins_only:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_pins(spec: UpstreamSpec, stream: trio.SSLStream[EagerSocketStream]) -> None:
    """Raise :class:`UpstreamTLSError` unless the server's key matches one of ``spec.pins``.

    Python before 3.13 exposes only the leaf certificate, so the pin must be the server's
    own key (that is what the openssl recipe in the README computes).
    """
    if not spec.pins:
        return
    leaf = stream.getpeercert(binary_form=True)
    if leaf is None or not pins.matches(spec.pins, [leaf]):
        try:
            presented = pins.spki_sha256_b64(leaf) if leaf else "none"
        except pins.PinError:
            presented = "unreadable"
        raise UpstreamTLSError(
            f"{spec.label}: server key pin {presented} matches none of the configured pins"
        )


async def open_tls(
    spec: UpstreamSpec, context: ssl.SSLContext
) -> trio.SSLStream[EagerSocketStream]:
    """Connect to ``spec`` and complete an authenticated TLS handshake (no deadline of its own).

    Error handling: raises :class:`UpstreamConnectError` (TCP) or :class:`UpstreamTLSError`
    (handshake, certificate, name or pins). Resource handling: on error nothing stays open;
    on success the caller owns the stream.
    """
    try:
        connected = await trio.open_tcp_stream(spec.host, spec.port)
    except OSError as exc:
        raise UpstreamConnectError(f"{spec.label}: connect failed: {exc.strerror or exc}") from exc
    # trio connected it (happy eyeballs, TCP_NODELAY, TCP_NOTSENT_LOWAT); the hot path then
    # runs over the bare socket (see EagerSocketStream).
    tcp = EagerSocketStream(socket.socket(fileno=connected.socket.detach()))
    # https_compatible: DNS messages are length-framed, so a TCP close without TLS close_notify
    # cannot truncate an answer unnoticed; treating it as plain EOF avoids spurious errors from
    # servers that skip close_notify, and closing costs no round trip.
    stream = trio.SSLStream(tcp, context, server_hostname=spec.auth_name, https_compatible=True)
    try:
        await stream.do_handshake()
        # RFC 8310 §5: strict profile; nothing is written before the pins matched.
        check_pins(spec, stream)
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise _handshake_error(spec, exc) from exc
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def tls_connector(ca_file: str | None, ca_data: str | None = None) -> Connect:
    """:func:`open_tls` with the context each upstream needs: its name checked against the
    trusted CAs, or (an upstream with pins and no name to check) its pins alone. ``ca_data``
    is ``ca_file``'s content when it was read already (before dropping privileges)."""
    verified = make_ssl_context(ca_file=ca_file, ca_data=ca_data)
    pins_only = make_ssl_context(ca_file=ca_file, ca_data=ca_data, pins_only=True)

    async def connect(spec: UpstreamSpec) -> trio.abc.Stream:
        return await open_tls(spec, verified if spec.check_name else pins_only)

    return connect


def _handshake_error(spec: UpstreamSpec, exc: trio.BrokenResourceError) -> UpstreamError:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return UpstreamTLSError(
            f"{spec.label}: certificate not trusted for {spec.auth_name!r}: {cause.verify_message}"
        )
    if isinstance(cause, ssl.SSLError):
        return UpstreamTLSError(f"{spec.label}: TLS handshake failed: {cause.reason or cause}")
    return UpstreamConnectError(f"{spec.label}: connection lost during the TLS handshake")


def quickack_hook(stream: trio.abc.SendStream) -> Callable[[], None] | None:
    """A function that sets TCP_QUICKACK on ``stream``'s socket, to call after each write; None
    where there is no TCP socket to set it on (a stream that is not ours over TCP, a system
    without the option)."""
    # Linux delays ACKs; a TLS 1.3 server that sends its session ticket first and then the
    # answer can sit ~40 ms on our delayed ACK. TCP_QUICKACK is not sticky, so it is set
    # again after each write.
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if (
        quickack is None
        or not isinstance(stream, trio.SSLStream)
        or not isinstance(stream.transport_stream, EagerSocketStream)
    ):
        return None
    sock = stream.transport_stream.socket

    def set_quickack() -> None:
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    return set_quickack
