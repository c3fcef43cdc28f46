"""Every use of a trio private attribute, in one place: what ``trio.SSLStream`` does not expose.

Two shortcuts through the stream's own ``ssl.SSLObject`` save scheduling rounds on the hot path:
:func:`buffered_plaintext` hands the reader every TLS record one socket read brought in, and
:class:`EagerSender` sends a query's record at once when nobody else is sending. Both read
``SSLStream._ssl_object``, ``._outgoing`` and ``._inner_send_lock``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import trio

from dot_proxy.upstream.socket_stream import EagerSocketStream

__all__ = ["EagerSender", "buffered_plaintext", "eager_sender"]

# Asked of each SSLObject.read; a TLS record holds at most 16 KiB, and each read returns one.
_DRAIN_CHUNK = 65536


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
    :class:`~dot_proxy.upstream.socket_stream.EagerSocketStream`, or a trio whose SSLStream lacks
    the attributes it relies on (``_ssl_object``, ``_outgoing``, ``_inner_send_lock``): then every
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
