"""Workers' slots in shared memory, pure: one writer per slot, any reader, no lock.

With ``--workers N`` the parent maps one anonymous shared region before it forks (so every
worker, and every worker restarted later, maps the same pages) and cuts it into N slots. Each
worker writes its metrics snapshot into its own slot; whichever worker answers a scrape reads
them all. A slot is a sequence lock: the writer makes the sequence odd, writes, and makes it
even again; a reader that saw it odd, or changed over its copy, read a half-written slot and
tries again. The sequence is a 64-bit word at an 8-byte aligned offset, written whole, so a
reader never sees it torn; x86-64 (and the kernels' ordering of stores through a shared
mapping on it) keeps the writer's stores in program order, which is all this needs.

A slot outlives its writer: a restarted worker starts from what its predecessor left there
(:func:`dot_proxy.core.metrics.carry`), so a restart never makes a counter go back.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["SLOT_SIZE", "SlotTable"]

#: Bytes per slot: a snapshot with a few dozen upstreams takes a fraction of it.
SLOT_SIZE: Final = 256 * 1024
_HEADER: Final = struct.Struct("=QQ")  # sequence, length of the data that follows


class SlotTable:
    """``count`` slots of ``size`` bytes in ``buffer`` (a writable buffer: shared memory)."""

    def __init__(self, buffer: memoryview, count: int, size: int = SLOT_SIZE) -> None:
        if size % 8 or size <= _HEADER.size or len(buffer) < count * size:
            raise ValueError("the buffer does not hold that many slots of that size")
        self._buffer = buffer
        self.count = count
        self.size = size

    @classmethod
    def bytes_needed(cls, count: int, size: int = SLOT_SIZE) -> int:
        return count * size

    @property
    def capacity(self) -> int:
        """The most data one slot holds."""
        return self.size - _HEADER.size

    def write(self, index: int, data: bytes) -> None:
        """Put ``data`` in slot ``index``: only its one writer may call this.

        Error handling: ValueError if ``data`` does not fit (the slot keeps what it had).
        """
        if len(data) > self.capacity:
            raise ValueError(f"{len(data)} bytes do not fit a slot of {self.capacity}")
        offset = index * self.size
        sequence = self._sequence(offset)
        if sequence % 2:  # a writer before this one died mid-write
            sequence += 1
        _HEADER.pack_into(self._buffer, offset, sequence + 1, len(data))
        start = offset + _HEADER.size
        self._buffer[start : start + len(data)] = data
        _HEADER.pack_into(self._buffer, offset, sequence + 2, len(data))

    def read(self, index: int) -> bytes | None:
        """What slot ``index`` holds, ``b""`` if it was never written; ``None`` if a write
        was under way (the caller tries again a moment later)."""
        offset = index * self.size
        before, length = _HEADER.unpack_from(self._buffer, offset)
        if before % 2 or length > self.capacity:
            return None
        start = offset + _HEADER.size
        data = bytes(self._buffer[start : start + length])
        if self._sequence(offset) != before:
            return None
        return data

    def _sequence(self, offset: int) -> int:
        sequence: int = _HEADER.unpack_from(self._buffer, offset)[0]
        return sequence
