"""The answer cache, pure: keys, what may be kept, TTL arithmetic, byte patches, an LRU bound.

An answer is stored as bytes, with its OPT record taken out and the offsets of its TTL fields
recorded, so that serving it to a client is a few byte patches, not a parse: the client's own
header (ID, RD) and question (letter case included: 0x20 clients check it), each TTL lowered by
the whole seconds the answer has spent here (RFC 1035 §7.4 / RFC 2181 §8), and an OPT record
only for a client that sent one (RFC 6891 §7). The clock is passed in as ``now`` (seconds on a
monotonic clock); nothing here imports trio. Coalescing, prefetch and serve-stale are policy and
live in :mod:`dot_proxy.resolver`; this module says only what is fresh, stale or gone.

What is kept (RFC 2308 §5 for negative answers): NOERROR answers, and NXDOMAIN and NODATA
answers that carry an SOA in their authority section, for min(SOA TTL, SOA MINIMUM). Never
kept: truncated, signed (TSIG, SIG(0)) or non-QUERY answers, any other RCODE (a SERVFAIL is
never reused), an answer with an EDNS Client Subnet option, and any answer with a TTL of 0.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Collection
from typing import Final

from dot_proxy.core.ecs import has_ecs
from dot_proxy.core.edns import option_spans
from dot_proxy.core.message import (
    EDNS_DO,
    FLAG_AA,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    HEADER,
    HEADER_SIZE,
    OPCODE_MASK,
    OUR_UDP_PAYLOAD,
    RCODE_MASK,
    SIGNATURE_TYPES,
    TYPE_OPT,
    TYPE_SOA,
    Query,
    Rcode,
    record_at,
)
from dot_proxy.errors import WireError

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "STALE_TTL",
    "AnswerCache",
    "CachedAnswer",
    "cache_key",
]

#: Answers kept at most, as CoreDNS's cache plugin; an entry is ~1 KiB (docs: README).
DEFAULT_CACHE_SIZE: Final = 10_000
#: RFC 8767 §4: the TTL of an answer served stale (30 s recommended).
STALE_TTL: Final = 30
#: RFC 8914 §4.4: Extended DNS Error 3, "Stale Answer", told to EDNS clients served stale.
_EDE_STALE: Final = struct.pack("!HHH", 15, 2, 3)

_FLAG_AD: Final = 0x0020
# RFC 2181 §8 made a TTL with the top bit set 0; RFC 8767 §4 reads it as positive instead and
# caps every TTL at 7 days. --cache-max-ttl clamps below that.
_TTL_CAP: Final = 604_800
_TTL = struct.Struct("!I")
# The key's last byte: DO and CD, the two query bits that change an answer's content.
_KEY_SUFFIX: Final = (b"\x00", b"\x01", b"\x02", b"\x03")
# A key is the question name, type (2 bytes), class (2) and that byte.
_NAME_END: Final = -5


def cache_key(query: Query, *, ecs_stripped: bool = False) -> bytes | None:
    """The key ``query`` is cached under, or ``None`` when it must bypass the cache.

    The question name compared case-insensitively, type and class (``Query.question_key``),
    and the DO and CD bits: we do not validate DNSSEC, so an answer with RRSIGs (DO=1) or one
    the upstream did not validate (CD=1) is not given to a query that asked otherwise. Whether
    the client sent an OPT record at all is not part of it (the OPT is rebuilt per client). A
    query whose options cannot be read bypasses it, and so does one with an EDNS Client Subnet
    option (RFC 7871 §7.3: its answer is tailored to that network) unless ``ecs_stripped``:
    the option is removed before the query goes upstream (:mod:`dot_proxy.core.ecs`), so the
    answer is everyone's and the query shares the entry of the same question without ECS.
    """
    opt = query.opt
    if opt is None:
        return query.question_key + _KEY_SUFFIX[1 if query.flags & FLAG_CD else 0]
    if len(opt) > _OPT_FIXED and _bypasses(opt[_OPT_FIXED:], ecs_stripped=ecs_stripped):
        return None
    do = 2 if ((opt[7] << 8) | opt[8]) & EDNS_DO else 0
    return query.question_key + _KEY_SUFFIX[do | (1 if query.flags & FLAG_CD else 0)]


# An OPT record's fixed part: root owner (1), TYPE, CLASS, TTL, RDLENGTH (RFC 6891 §6.1.2).
_OPT_FIXED: Final = 11


def _bypasses(rdata: bytes, *, ecs_stripped: bool) -> bool:
    if not ecs_stripped:
        return has_ecs(rdata)
    try:
        option_spans(rdata)
    except WireError:
        return True
    return False


def _client_opt(dnssec_ok: bool, *, stale: bool) -> bytes:
    # The OPT record a cached answer carries for an EDNS client: our payload size, its DO bit,
    # and for a stale answer the Extended DNS Error that says so.
    options = _EDE_STALE if stale else b""
    fixed = struct.pack("!BHHHHH", 0, TYPE_OPT, OUR_UDP_PAYLOAD, 0, EDNS_DO if dnssec_ok else 0, 0)
    return fixed[:-2] + len(options).to_bytes(2, "big") + options


# Indexed by [dnssec_ok][stale].
_CLIENT_OPTS: Final = tuple(
    tuple(_client_opt(do, stale=stale) for stale in (False, True)) for do in (False, True)
)


class CachedAnswer:
    """One stored answer and what serving it needs, patched per client by :meth:`for_client`.

    Times are seconds on the caller's monotonic clock. ``expires`` is when it stops being
    fresh; ``stale_until`` when it goes for good (``expires`` plus the serve-stale window).
    The policy fields (``refreshing``, ``retry_at``) belong to the resolver. ``gone`` is set
    once the cache no longer holds it (evicted, expired for good, or replaced).
    """

    __slots__ = (
        "_flags",
        "_memo_age",
        "_memo_tail",
        "_stale_tail",
        "_ttl_offsets",
        "_ttls",
        "arcount",
        "counts",
        "expires",
        "gone",
        "message",
        "prefetch_at",
        "question_end",
        "refreshing",
        "retry_at",
        "stale_until",
        "stored",
        "ttl",
    )

    def __init__(
        self,
        message: bytes,
        question_end: int,
        ttl_offsets: tuple[int, ...],
        ttls: tuple[int, ...],
        *,
        now: float,
        serve_stale: float,
    ) -> None:
        _, flags, _, ancount, nscount, arcount = HEADER.unpack_from(message)
        self.message = message  # TTLs already clamped; no OPT record
        self.question_end = question_end
        self._ttl_offsets = ttl_offsets
        self._ttls = ttls
        # RD comes from each client; AA goes (an answer from a cache is not authoritative,
        # RFC 1035 §6.2); AD is given only to clients that ask for it (RFC 6840 §5.8).
        self._flags = flags & ~(FLAG_RD | FLAG_AA | FLAG_TC) | FLAG_QR | FLAG_RA
        self.counts = (ancount, nscount)
        self.arcount = arcount
        self.ttl = min(ttls)
        self.stored = now
        self.expires = now + self.ttl
        # RFC-less but common (unbound's prefetch): refresh in the last tenth of the TTL.
        self.prefetch_at = self.expires - self.ttl / 10
        self.stale_until = self.expires + serve_stale
        self.refreshing = False
        self.retry_at = 0.0
        self.gone = False
        self._memo_age = 0
        self._memo_tail = message[question_end:]
        self._stale_tail: bytes | None = None

    def for_client(self, query: Query, now: float, *, stale: bool = False) -> bytes:
        """This answer as the client that sent ``query`` must see it (not yet truncated).

        Its ID, RD bit and question bytes; each TTL lowered by the whole seconds spent here
        (never below 0), or :data:`STALE_TTL` when ``stale``; an OPT record only if it sent one.
        """
        tail = self._stale(STALE_TTL) if stale else self._tail_at(int(now - self.stored))
        flags = self._flags | (query.flags & FLAG_RD)
        if not query.flags & _FLAG_AD and (query.opt is None or not query.opt[7] & 0x80):
            flags &= ~_FLAG_AD
        ancount, nscount = self.counts
        if query.opt is None:
            header = HEADER.pack(query.id, flags, 1, ancount, nscount, self.arcount)
            return header + query.question + tail
        header = HEADER.pack(query.id, flags, 1, ancount, nscount, self.arcount + 1)
        return header + query.question + tail + _CLIENT_OPTS[query.opt[7] >> 7][stale]

    def _tail_at(self, age: int) -> bytes:
        # Everything after the question, with TTLs lowered by ``age``. Kept per whole second:
        # under load a popular answer is patched once a second, not once per query.
        if age == self._memo_age:
            return self._memo_tail
        tail = bytearray(self.message)
        for offset, ttl in zip(self._ttl_offsets, self._ttls, strict=True):
            _TTL.pack_into(tail, offset, ttl - age if ttl > age else 0)
        self._memo_age, self._memo_tail = age, bytes(tail[self.question_end :])
        return self._memo_tail

    def _stale(self, ttl: int) -> bytes:
        if self._stale_tail is None:
            tail = bytearray(self.message)
            for offset in self._ttl_offsets:
                _TTL.pack_into(tail, offset, ttl)
            self._stale_tail = bytes(tail[self.question_end :])
        return self._stale_tail


def make_entry(
    answer: bytes,
    question_end: int,
    *,
    now: float,
    min_ttl: int,
    max_ttl: int,
    serve_stale: float,
) -> CachedAnswer | None:
    """A :class:`CachedAnswer` for an upstream's answer, or ``None`` if it must not be kept.

    ``question_end`` is where the answer's one question ends (it matched the query's). TTLs
    are clamped to ``min_ttl``..``max_ttl``; an SOA in the authority section counts for
    min(its TTL, its MINIMUM) (RFC 2308 §5). A negative answer (NXDOMAIN, or NOERROR with no
    answer records) is kept only with such an SOA. Never raises: an answer that cannot be
    walked is not kept.
    """
    if len(answer) < HEADER_SIZE:
        return None
    _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(answer)
    rcode = flags & RCODE_MASK
    if (
        qdcount != 1
        or not flags & FLAG_QR
        or flags & (FLAG_TC | OPCODE_MASK)
        or rcode not in (Rcode.NOERROR, Rcode.NXDOMAIN)
    ):
        return None
    try:
        walked = _walk(answer, question_end, ancount, nscount, arcount)
    except WireError:
        return None
    if walked is None:
        return None
    ttl_offsets, ttls, opt, has_soa, records_end = walked
    negative = rcode == Rcode.NXDOMAIN or ancount == 0
    if not ttls or (negative and not has_soa):
        return None
    message = answer[:records_end]
    if opt is not None:
        start, end = opt
        removed = end - start
        message = message[:start] + message[end:]
        message = message[:10] + (arcount - 1).to_bytes(2, "big") + message[HEADER_SIZE:]
        ttl_offsets = tuple(o - removed if o > start else o for o in ttl_offsets)
    clamped = tuple(min(max(ttl, min_ttl), max_ttl, _TTL_CAP) for ttl in ttls)
    if clamped != ttls:
        patched = bytearray(message)
        for offset, ttl in zip(ttl_offsets, clamped, strict=True):
            _TTL.pack_into(patched, offset, ttl)
        message = bytes(patched)
    return CachedAnswer(
        message, question_end, ttl_offsets, clamped, now=now, serve_stale=serve_stale
    )


# TTL offsets, TTLs, the OPT record's span, whether an SOA is in authority, where records end.
_Walked = tuple[tuple[int, ...], tuple[int, ...], tuple[int, int] | None, bool, int]


def _walk(answer: bytes, offset: int, ancount: int, nscount: int, arcount: int) -> _Walked | None:
    """Every record's TTL (offset, value), the OPT record, whether an SOA is in authority, and
    where the last record ends.

    ``None`` for an answer that must not be kept: a TTL of 0, a signature, an OPT record with
    an extended RCODE or an ECS option, or an SOA too short to hold its MINIMUM.
    """
    offsets: list[int] = []
    ttls: list[int] = []
    opt: tuple[int, int] | None = None
    has_soa = False
    authority_from, additional_from = ancount, ancount + nscount
    for index in range(additional_from + arcount):
        start = offset
        fixed, offset = record_at(answer, start)
        rr_type = (answer[fixed] << 8) | answer[fixed + 1]
        if index >= additional_from:
            if rr_type == TYPE_OPT:
                # RFC 6891 §6.1.3: the TTL field holds the extended RCODE (upper 8 bits).
                if opt is not None or answer[start] != 0 or answer[fixed + 4]:
                    return None
                if has_ecs(answer[fixed + 10 : offset]):
                    return None
                opt = (start, offset)
                continue
            if rr_type in SIGNATURE_TYPES:
                return None
        ttl = _TTL.unpack_from(answer, fixed + 4)[0]
        if rr_type == TYPE_SOA and authority_from <= index < additional_from:
            # RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); MINIMUM is the
            # last field of the SOA's RDATA, after two names of at least one byte each.
            if offset - (fixed + 10) < 22:
                return None
            ttl = min(ttl, _TTL.unpack_from(answer, offset - 4)[0])
            has_soa = True
        if ttl == 0:
            return None
        offsets.append(fixed + 4)
        ttls.append(ttl)
    return tuple(offsets), tuple(ttls), opt, has_soa, offset


class AnswerCache:
    """Answers by :func:`cache_key`, at most ``size`` of them, least recently used evicted first.

    ``serve_stale`` seconds is how long an expired answer is kept for RFC 8767 (0: not at all).
    Counters (``hits``, ``misses``, ``stale_answers``, ``evictions``) only ever grow; the
    resolver adds to ``hits``, ``misses`` and ``stale_answers``.
    """

    def __init__(
        self, *, size: int, min_ttl: int = 0, max_ttl: int = 86400, serve_stale: float = 0.0
    ) -> None:
        if size < 1:
            raise ValueError("a cache holds at least one answer")
        self.size = size
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.serve_stale = serve_stale
        self._entries: OrderedDict[bytes, CachedAnswer] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale_answers = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> CachedAnswer | None:
        """The answer under ``key``, fresh or within its serve-stale window, else ``None``.

        A hit becomes the most recently used; an answer past its window is dropped.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until:
            del self._entries[key]
            entry.gone = True
            return None
        self._entries.move_to_end(key)
        return entry

    def touch(self, key: bytes) -> None:
        """Count a use of the answer under ``key`` for the LRU order (it must be there)."""
        self._entries.move_to_end(key)

    def put(self, key: bytes, answer: bytes, question_end: int, now: float) -> CachedAnswer | None:
        """Store an upstream's answer under ``key`` if it may be kept; the entry, or ``None``.

        An answer that may not be kept leaves what was stored before in place: a SERVFAIL
        during an outage must not push out the answer serve-stale would give.
        """
        entry = make_entry(
            answer,
            question_end,
            now=now,
            min_ttl=self.min_ttl,
            max_ttl=self.max_ttl,
            serve_stale=self.serve_stale,
        )
        if entry is None:
            return None
        entries = self._entries
        old = entries.get(key)
        if old is not None:
            old.gone = True
        entries[key] = entry
        entries.move_to_end(key)
        if len(entries) > self.size:
            entries.popitem(last=False)[1].gone = True
            self.evictions += 1
        return entry

    def drop_names(self, names: Collection[bytes]) -> int:
        """Drop every answer whose question name (lower-cased wire form) is in ``names``, of
        any type, class and DO/CD; how many went. For names that are now answered otherwise
        (a hosts file that lists them): walks every entry, for a change that is rare."""
        doomed = [key for key in self._entries if key[:_NAME_END] in names]
        for key in doomed:
            self._entries.pop(key).gone = True
        return len(doomed)

    def resize(self, size: int, *, min_ttl: int, max_ttl: int, serve_stale: float) -> None:
        """New bounds (a configuration reload); entries over the new size go, oldest first."""
        if size < 1:
            raise ValueError("a cache holds at least one answer")
        self.size, self.min_ttl, self.max_ttl = size, min_ttl, max_ttl
        self.serve_stale = serve_stale
        while len(self._entries) > size:
            self._entries.popitem(last=False)[1].gone = True
            self.evictions += 1
