"""Zone names and a zone table with longest match on label boundaries, sans-I/O.

Names are kept in wire format, lower-cased (RFC 1035 §3.1, RFC 4343: names compare
case-insensitively, ASCII letters only): that is what a parsed query already holds (its
``question_key`` minus the last four bytes, type and class), so matching a query costs no
conversion. A name's ancestors are its suffixes that start at a label boundary, which the label
lengths mark unambiguously: ``\\x08xexample\\x03com\\x00`` has the suffix ``\\x03com\\x00`` and
never ``\\x07example\\x03com\\x00``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Final, Generic, TypeVar

__all__ = [
    "ROOT",
    "ZoneTable",
    "ancestors",
    "name_from_wire",
    "name_to_wire",
    "top_level",
]

T = TypeVar("T")

ROOT: Final = b"\x00"
MAX_WIRE_LENGTH: Final = 255
MAX_LABEL_LENGTH: Final = 63
# Host-name characters (RFC 952, RFC 1123 §2.1) plus the underscore of service names
# (RFC 8552): what a configured zone or a hosts-file name may hold. Escapes and non-ASCII
# names are refused rather than guessed at; IDNs are written in their xn-- form.
_LABEL: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")


def name_to_wire(text: str) -> bytes:
    """The lower-cased wire form of a presentation name.

    ``example.com``, ``Example.COM.`` and ``example.com.`` give the same bytes; ``.`` (or the
    empty string) is the root.

    Error handling: raises :class:`ValueError` with the reason for an empty label, a label
    longer than 63 bytes or with a character outside letters, digits, ``-`` and ``_``, and a
    name longer than 255 bytes in wire format.
    """
    stripped = text[:-1] if text.endswith(".") else text
    if not stripped:
        return ROOT
    parts: list[bytes] = []
    for label in stripped.split("."):
        if not label:
            raise ValueError("empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"label {label[:20]!r}... longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"label {label!r} holds a character other than A-Z, 0-9, - and _")
        parts.append(bytes((len(label),)) + label.lower().encode("ascii"))
    wire = b"".join(parts) + ROOT
    if len(wire) > MAX_WIRE_LENGTH:
        raise ValueError("name longer than 255 bytes")
    return wire


def name_from_wire(wire: bytes) -> str:
    """The presentation form (with the final dot) of an uncompressed wire name, for logs.

    Bytes outside printable ASCII, dots and backslashes inside labels are escaped as
    RFC 1035 §5.1 says (``\\DDD`` and ``\\.``).
    """
    labels = [_escape(label) for label in _labels(wire)]
    return ".".join(labels) + "." if labels else "."


def ancestors(wire: bytes) -> Iterator[bytes]:
    """The name's proper ancestors, nearest first, the root last (none for the root)."""
    offset = 0
    while offset < len(wire) and wire[offset]:
        offset += wire[offset] + 1
        yield wire[offset:]


def top_level(wire: bytes) -> bytes:
    """The name's top-level domain (``\\x03com\\x00`` for ``www.example.com.``); the root for
    the root."""
    tld = wire
    for ancestor in ancestors(wire):
        if ancestor == ROOT:
            break
        tld = ancestor
    return tld


class ZoneTable(Generic[T]):
    """Zones (lower-cased wire names) with a value each; a name finds its closest enclosing zone.

    Most names are under no zone (``www.example.com`` when the zones are under ``arpa``): one
    ``bytes.endswith`` against the zones' top-level labels turns them away, whatever their
    length (a byte match that is not on a label boundary only costs the walk). Otherwise the
    walk goes from the root down and stops at the first suffix that neither is a zone nor
    encloses one.
    """

    __slots__ = ("_prefixes", "_tlds", "_zones")

    def __init__(self, zones: Mapping[bytes, T]) -> None:
        self._zones = dict(zones)
        prefixes: set[bytes] = set()
        for zone in self._zones:
            prefixes.add(zone)
            prefixes.update(ancestors(zone))
        self._prefixes = frozenset(prefixes)
        # With the root as a zone every name matches: no shortcut.
        tlds = {zone for zone in prefixes if zone != ROOT and _is_tld(zone)}
        self._tlds: tuple[bytes, ...] | None = None if ROOT in self._zones else tuple(tlds)

    def __len__(self) -> int:
        return len(self._zones)

    def longest_match(self, name: bytes) -> T | None:
        """The value of the deepest zone that is ``name`` or encloses it, else ``None``.

        ``name`` is a lower-cased, uncompressed wire name (a query's ``question_key[:-4]``);
        a name whose labels run past its end matches nothing.
        """
        if self._tlds is not None and not name.endswith(self._tlds):
            return None  # the usual case, checked before the call below
        zone = self.enclosing_zone(name)
        return None if zone is None else self._zones[zone]

    def enclosing_zone(self, name: bytes) -> bytes | None:
        """The deepest zone that is ``name`` or encloses it (its wire name), else ``None``."""
        if self._tlds is not None and not name.endswith(self._tlds):
            return None
        prefixes = self._prefixes
        starts: list[int] = []
        offset, end = 0, len(name)
        while True:
            if offset >= end:
                return None
            length = name[offset]
            if not length:
                break
            starts.append(offset)
            offset += length + 1
        if offset != end - 1:
            return None  # bytes after the root label: not one name
        best = ROOT if ROOT in self._zones else None
        for start in reversed(starts):
            suffix = name[start:]
            if suffix not in prefixes:
                break
            if suffix in self._zones:
                best = suffix
        return best


def _is_tld(wire: bytes) -> bool:
    return len(wire) == wire[0] + 2


def _labels(wire: bytes) -> Iterator[bytes]:
    offset = 0
    while offset < len(wire) and wire[offset]:
        length = wire[offset]
        yield wire[offset + 1 : offset + 1 + length]
        offset += length + 1


def _escape(label: bytes) -> str:
    out: list[str] = []
    for byte in label:
        char = chr(byte)
        if char in '.\\"();@$':
            out.append("\\" + char)
        elif 0x21 <= byte <= 0x7E:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)
