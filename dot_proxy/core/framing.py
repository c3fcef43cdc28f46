"""Length-prefixed DNS messages on a byte stream (RFC 1035 §4.2.2, RFC 7858 §3.3), sans-I/O.

:func:`frame` prefixes a message with its length; :class:`FrameDecoder` is the incremental
decoder (``feed(data)``, then ``next_message()`` until :data:`NEED_DATA`), with a hard cap on
what it buffers. No trio, no sockets, no clock.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from dot_proxy.core.message import MAX_MESSAGE_SIZE
from dot_proxy.errors import WireError

__all__ = [
    "NEED_DATA",
    "FrameDecoder",
    "NeedData",
    "frame",
    "frame_with_id",
]

_FRAME_AND_ID = struct.Struct("!HH")  # TCP length prefix, then the message's ID


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = enum.auto()


#: Returned by :meth:`FrameDecoder.next_message` when no complete message is buffered.
NEED_DATA: Final = NeedData.NEED_DATA


def frame(message: bytes) -> bytes:
    """Prefix a message with its two-byte length, for TCP and TLS (RFC 1035 §4.2.2)."""
    if len(message) > MAX_MESSAGE_SIZE:
        raise WireError("message longer than 65,535 bytes", rcode=None)
    return len(message).to_bytes(2, "big") + message


def frame_with_id(message: bytes, new_id: int) -> bytes:
    """``frame(replace_id(message, new_id))`` in one concatenation (every upstream query)."""
    if len(message) > MAX_MESSAGE_SIZE:
        raise WireError("message longer than 65,535 bytes", rcode=None)
    return _FRAME_AND_ID.pack(len(message), new_id) + message[2:]


class FrameDecoder:
    """Split a byte stream into length-prefixed DNS messages (RFC 1035 §4.2.2, RFC 7858 §3.3).

    Feed it whatever arrives with :meth:`feed`, then call :meth:`next_message` until it returns
    :data:`NEED_DATA`. It never holds more than ``max_buffer`` bytes: a peer that sends faster
    than the owner drains is an error, not a memory leak.
    """

    __slots__ = ("_buffer", "_max_buffer", "_start")

    def __init__(self, *, max_buffer: int = 4 * (MAX_MESSAGE_SIZE + 2)) -> None:
        if max_buffer < MAX_MESSAGE_SIZE + 2:
            raise ValueError("max_buffer must hold at least one whole message")
        self._buffer = bytearray()
        self._start = 0
        self._max_buffer = max_buffer

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes.

        Error handling: raises :class:`WireError` (rcode ``None``) if more than ``max_buffer``
        bytes would then be waiting.
        """
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        if len(self._buffer) + len(data) > self._max_buffer:
            raise WireError("peer sent more than the frame buffer holds", rcode=None)
        self._buffer += data

    def next_message(self) -> bytes | NeedData:
        """The next whole message, or :data:`NEED_DATA`. A zero-length frame gives ``b""``."""
        buffer, start = self._buffer, self._start
        available = len(buffer) - start
        if available < 2:
            return NEED_DATA
        size = (buffer[start] << 8) | buffer[start + 1]
        if available < size + 2:
            return NEED_DATA
        end = start + 2 + size
        message = bytes(buffer[start + 2 : end])
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        else:
            self._start = end
        return message

    @property
    def in_frame(self) -> bool:
        """Whether bytes are waiting that :meth:`next_message` has not returned yet."""
        return self.buffered > 0
