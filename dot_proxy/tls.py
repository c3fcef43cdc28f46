"""Opening an authenticated TLS connection to an upstream resolver (RFC 7858 §3.2, RFC 8310 §5).

The client context (CA, host name, TLS 1.2 at least, ALPN ``dot``), the handshake over a bare
non-blocking socket (:class:`~dot_proxy.streams.EagerSocketStream`), the SPKI pin check that
comes before any byte is written (RFC 7858 §4.2), and TCP_QUICKACK. trio and ssl exceptions are
mapped to :mod:`dot_proxy.errors` here.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from contextlib import suppress

import trio

from dot_proxy import pins
from dot_proxy.config import UpstreamSpec
from dot_proxy.errors import UpstreamConnectError, UpstreamError, UpstreamTLSError
from dot_proxy.streams import EagerSocketStream

__all__ = [
    "EagerSender",
    "buffered_plaintext",
    "check_pins",
    "eager_sender",
    "make_ssl_context",
    "open_tls",
    "quickack_hook",
]

# Asked of each SSLObject.read; a TLS record holds at most 16 KiB, and each read returns one.
_DRAIN_CHUNK = 65536


def make_ssl_context(*, ca_file: str | None, pins_only: bool = False) -> ssl.SSLContext:
    """The client TLS context for upstreams (RFC 7858 §3.2, RFC 8310 §5 strict profile).

    System CAs, or only ``ca_file`` when given; certificate and host name checked; TLS 1.2 at
    least; ALPN ``dot`` (RFC 7858 §3.1 does not require it, but servers that host several
    protocols on one port use it). ``pins_only`` is for upstreams authenticated by SPKI pins
    alone (RFC 7858 §4.2): the chain and name go unchecked because the pin check after the
    handshake, which nothing skips, is the authentication.
    """
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


def _handshake_error(spec: UpstreamSpec, exc: trio.BrokenResourceError) -> UpstreamError:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return UpstreamTLSError(
            f"{spec.label}: certificate not trusted for {spec.auth_name!r}: {cause.verify_message}"
        )
    if isinstance(cause, ssl.SSLError):
        return UpstreamTLSError(f"{spec.label}: TLS handshake failed: {cause.reason or cause}")
    return UpstreamConnectError(f"{spec.label}: connection lost during the TLS handshake")


def quickack_hook(stream: trio.SSLStream[EagerSocketStream]) -> Callable[[], None] | None:
    # Linux delays ACKs; a TLS 1.3 server that sends its session ticket first and then the
    # answer can sit ~40 ms on our delayed ACK. TCP_QUICKACK is not sticky, so it is set
    # again after each write.
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return None
    sock = stream.transport_stream.socket

    def set_quickack() -> None:
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    return set_quickack


def buffered_plaintext(stream: trio.abc.ReceiveStream) -> Callable[[], bytes]:
    """A function returning the plaintext of every TLS record ``stream`` already holds.

    ``SSLStream.receive_some`` decrypts one TLS record per call (OpenSSL's ``SSL_read`` stops
    at a record boundary), and when that record was already buffered it yields a scheduling
    round before returning. A resolver that writes each answer in its own record (unbound
    does, and one transport read brings ~90 of them under load) then cost the reader one
    round per answer: the answers reached their tasks one round apart, so the clients' next
    queries, and our writes upstream, came in dribbles too. Measured with ``bench/ab.py``,
    draining what one read brought in, after each ``receive_some``, about halved the CPU
    per query.

    The function only decrypts bytes the stream has already received, through the stream's
    own ``ssl.SSLObject``, without any I/O: the stream still does every read and write, the
    handshake and the close. It stops at the first record that is incomplete, and at any TLS
    error or close_notify, leaving that to the next ``receive_some``, which raises or returns
    b"" as usual (and sends anything the TLS layer has queued meanwhile, such as a KeyUpdate
    reply). For a stream that is not an ``SSLStream`` (the fuzz harness's fakes), or a trio
    that stores no ``_ssl_object``, it always returns b"": one record per ``receive_some``,
    slower but the same bytes.
    """
    ssl_object = getattr(stream, "_ssl_object", None)
    if not isinstance(ssl_object, ssl.SSLObject):
        return bytes  # bytes() is b""
    read = ssl_object.read

    def drain() -> bytes:
        chunks = []
        while True:
            try:
                chunk = read(_DRAIN_CHUNK)
            except ssl.SSLError:  # SSLWantReadError: nothing whole is buffered; or a failure
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    return drain


class EagerSender:
    """Sends on an ``SSLStream`` without its scheduling round, when the socket takes the record.

    ``SSLStream.send_all`` yields a scheduling round before its bytes reach the socket: it
    takes the stream's internal send lock, and trio's lock acquire always yields. At low load
    each round is a fifth of a query's time through the proxy. When nobody holds the lock, a
    record can go at once instead: the stream's own ``ssl.SSLObject`` encrypts into the
    stream's outgoing buffer, which :meth:`send_nowait` takes whole, and one non-blocking
    ``send`` hands it to the kernel, with no await in between, so no other task can slip bytes
    in. If the kernel takes only part, :meth:`finish` sends the rest under the lock, taken
    before anyone else can (it was free, and nothing may await in between), so it still goes
    before any record encrypted after it.

    Only for one writer at a time, like ``send_all`` (the stream's reader may still send its
    own records: those hold the lock). Error handling: ``trio.BrokenResourceError`` as from
    ``send_all`` (also for a TLS layer that wants to read before it writes: a renegotiation,
    which DoT has no use for); the stream is then unusable and its owner closes it.
    """

    __slots__ = ("_lock", "_outgoing", "_socket", "_stream", "_take", "_transport", "_write")

    def __init__(
        self,
        stream: trio.SSLStream[EagerSocketStream],
        ssl_object: ssl.SSLObject,
        outgoing: ssl.MemoryBIO,
        lock: trio.StrictFIFOLock,
    ) -> None:
        self._stream = stream
        self._transport = stream.transport_stream
        self._socket = self._transport.socket
        self._write, self._take = ssl_object.write, outgoing.read
        self._outgoing = outgoing
        self._lock = lock

    def send_nowait(self, data: bytes) -> memoryview | None:
        """Encrypt and send ``data`` now; what the kernel did not take, or None.

        None means nothing was done: the lock is held, and ``data`` must wait its turn (say,
        in ``send_all``). Anything else left over must go through :meth:`finish` before the
        caller awaits anything else.
        """
        # Whoever holds the lock has records from before ours to send: and trio takes a
        # record from the outgoing buffer and the lock without yielding in between.
        if self._lock.locked() or self._outgoing.pending:
            return None
        try:
            self._write(data)
            record = self._take()
            sent = self._socket.send(record)
        except BlockingIOError:
            sent = 0
        except (ssl.SSLError, OSError) as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc
        return memoryview(record)[sent:]

    async def finish(self, rest: memoryview) -> None:
        """Send what :meth:`send_nowait` left over (nothing, if it is empty)."""
        if rest:
            async with self._lock:
                await self._transport.send_all(rest)

    async def send_all(self, data: bytes) -> None:
        """``stream.send_all(data)``, without a scheduling round when the kernel takes it all."""
        rest = self.send_nowait(data)
        if rest is None:
            await self._stream.send_all(data)
        else:
            await self.finish(rest)


def eager_sender(stream: trio.abc.SendStream) -> EagerSender | None:
    """An :class:`EagerSender` for ``stream``, or None if it cannot have one.

    That is a stream that is not an ``SSLStream`` over an
    :class:`~dot_proxy.streams.EagerSocketStream`, or a trio whose SSLStream lacks the
    attributes it relies on (``_ssl_object``, ``_outgoing``, ``_inner_send_lock``): then every
    write goes through ``send_all``, a round slower at low load but the same bytes.
    """
    ssl_object = getattr(stream, "_ssl_object", None)
    outgoing = getattr(stream, "_outgoing", None)
    lock = getattr(stream, "_inner_send_lock", None)
    if not (
        isinstance(stream, trio.SSLStream)
        and isinstance(stream.transport_stream, EagerSocketStream)
        and isinstance(ssl_object, ssl.SSLObject)
        and isinstance(outgoing, ssl.MemoryBIO)
        and isinstance(lock, trio.StrictFIFOLock)
    ):
        return None
    return EagerSender(stream, ssl_object, outgoing, lock)
