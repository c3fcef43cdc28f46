"""Every use of a trio private attribute, in one place: scheduling rounds that trio's public API
does not let the upstream side skip.

``trio.SSLStream`` yields a scheduling round inside every ``send_all`` (its send lock's acquire)
and after every ``receive_some`` that found its record already buffered: rounds paid per query
on the hot path (docs/performance.md has what they cost). Two shortcuts go through the stream's
own ``ssl.SSLObject`` instead:

- :func:`round_saving_drain` hands the reader every TLS record one socket read brought in, in
  one go instead of one ``receive_some`` (and one round) each;
- :class:`RoundSavingSender` puts a record on the socket at once when nobody else is sending,
  instead of after the lock's round.

They read three attributes of ``SSLStream`` (:data:`INTERNALS`): ``_ssl_object``, ``_outgoing``
and ``_inner_send_lock``. No public trio or ssl API reaches them: ``SSLStream`` forwards only a
fixed set of ``SSLObject`` methods (``pending``, ``getpeercert``, ...), not ``read`` or
``write``.

**The ordering inside trio that both rely on** (``trio/_ssl.py``, ``SSLStream._retry``): a task
that made TLS bytes takes them from ``_outgoing`` and joins the queue of ``_inner_send_lock`` (a
``StrictFIFOLock``) without yielding in between, and hands them to the transport only while it
holds that lock. So whenever our code runs, either the lock is free and ``_outgoing`` empty, and
then no TLS bytes are waiting to go out, or they are, and bytes go out in the order they left
``_outgoing``. ``_delayed_outgoing``, the one other path, is for server-side streams only.

At run time, on a trio that lacks any of them (it renamed or retyped one), nothing breaks and
nothing is silent: :func:`missing_internals` names what is missing,
``pool.default_connector`` logs it as a warning once at start, and every connection takes
trio's public path (``send_all``, one ``receive_some`` per record): the same bytes, a
scheduling round more per write and per record.
``tests/test_trio_private.py`` fails on such a trio, and pyproject.toml pins trio to the
releases the suite passed on.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Final

import trio

from dot_proxy.upstream.socket_stream import EagerSocketStream

__all__ = [
    "INTERNALS",
    "RoundSavingSender",
    "missing_internals",
    "round_saving_drain",
    "round_saving_sender",
]

# The SSLStream attributes used here, and the type each must have.
INTERNALS: Final[dict[str, type]] = {
    "_ssl_object": ssl.SSLObject,
    "_outgoing": ssl.MemoryBIO,
    "_inner_send_lock": trio.StrictFIFOLock,
}

# Asked of each SSLObject.read; a TLS record holds at most 16 KiB, and each read returns one.
_DRAIN_CHUNK = 65536


def missing_internals() -> list[str]:
    """What this trio's ``SSLStream`` lacks of :data:`INTERNALS`, one line each; [] if nothing.

    Looks at a throwaway stream that is never connected (the attributes are set in
    ``__init__``), so it needs no event loop.
    """
    stream = trio.SSLStream(
        _Unconnected(), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), server_hostname="unconnected"
    )
    problems = _lacking(stream)
    # An SSLStream holds itself (its handshake-once keeps a bound method): a cycle that only
    # the collector would free (tests/test_no_cycles.py). This one never handshakes.
    vars(stream).pop("_handshook", None)
    return problems


def _lacking(stream: object) -> list[str]:
    # What ``stream`` lacks of INTERNALS, one line each: the one place they are checked.
    problems = []
    for name, kind in INTERNALS.items():
        value = getattr(stream, name, None)
        if not isinstance(value, kind):
            found = "nothing" if value is None else type(value).__qualname__
            problems.append(f"SSLStream.{name} is {found}, not {kind.__qualname__}")
    return problems


def round_saving_drain(stream: trio.abc.ReceiveStream) -> Callable[[], bytes]:
    """A function returning the plaintext of every TLS record ``stream`` already holds.

    ``SSLStream.receive_some`` decrypts one TLS record per call (OpenSSL's ``SSL_read`` stops
    at a record boundary), and when that record was already buffered it yields a scheduling
    round before returning. A resolver that writes each answer in its own record (unbound
    does, and one transport read brings dozens of them under load) would cost the reader one
    round per answer: the answers would reach their tasks one round apart, and the clients'
    next queries, and our writes upstream, would come in dribbles too. Called after each
    ``receive_some``, this decrypts the rest in one go, and the answers wake their tasks in one
    round.

    It only decrypts bytes the stream has already received, through the stream's own
    ``ssl.SSLObject``, without any I/O: the stream still does every read and write, the
    handshake and the close. It stops at the first record that is incomplete, and at any TLS
    error or close_notify, leaving that to the next ``receive_some``, which raises or returns
    b"" as usual (and sends anything the TLS layer has queued meanwhile, such as a KeyUpdate
    reply). For a stream that is not an ``SSLStream`` (the fuzz harness's pipes), or a trio
    without ``_ssl_object`` (see the module's docstring), it always returns b"".
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


class RoundSavingSender:
    """Sends on an ``SSLStream`` without its scheduling round, when the socket takes the record.

    ``SSLStream.send_all`` yields a scheduling round before its bytes reach the socket: it
    takes the stream's internal send lock, and trio's lock acquire always yields. When nobody
    holds the lock, a record can go at once instead: the stream's own ``ssl.SSLObject``
    encrypts into the stream's outgoing buffer, which :meth:`send_nowait` takes whole, and one
    non-blocking ``send`` hands it to the kernel, with no await in between, so no other task
    can slip bytes in (by the ordering in the module's docstring, a free lock and an empty
    buffer mean no bytes are waiting). If the kernel takes only part, :meth:`finish` sends the
    rest under the lock, taken before anyone else can (it was free, and nothing may await in
    between), so it still goes before any record encrypted after it.

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
        # Whoever holds the lock, or will take what is in the buffer, has records from
        # before ours to send.
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


def round_saving_sender(stream: trio.abc.SendStream) -> RoundSavingSender | None:
    """A :class:`RoundSavingSender` for ``stream``, or None if it cannot have one.

    That is a stream that is not an ``SSLStream`` over an
    :class:`~dot_proxy.upstream.socket_stream.EagerSocketStream`, or a trio whose SSLStream lacks
    :data:`INTERNALS` (see the module's docstring): then every write goes through ``send_all``.
    """
    if (
        not isinstance(stream, trio.SSLStream)
        or not isinstance(stream.transport_stream, EagerSocketStream)
        or _lacking(stream)
    ):
        return None
    return RoundSavingSender(stream, stream._ssl_object, stream._outgoing, stream._inner_send_lock)


class _Unconnected(trio.abc.Stream):
    """The transport of the stream :func:`missing_internals` looks at: never used."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.ClosedResourceError("never connected")

    async def wait_send_all_might_not_block(self) -> None:
        raise trio.ClosedResourceError("never connected")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.ClosedResourceError("never connected")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
