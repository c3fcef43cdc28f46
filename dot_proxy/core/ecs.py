"""EDNS Client Subnet (RFC 7871), sans-I/O: remove the option from queries and answers.

A client's ECS option tells every resolver on the way, and the authoritative servers behind
them, which network the query came from (RFC 7871 §11.1: a privacy cost). The option is
removed from a query before it goes upstream, and from an answer before it goes back to the
client (the client's option was not sent, so an answer's option is about our query, not the
client's; RFC 7871 §7.2.1 also says an answer carries one only when the query did).

Removed, rather than replaced by an option with SOURCE PREFIX-LENGTH 0 (RFC 7871 §7.1.2, what
stubby's ``edns_client_subnet_private`` sends), because then a query that carried ECS leaves
exactly as one that did not: one privacy rule for every query, and one cache entry (with ECS
removed, the answer is not tailored to the client's network, so the cache keys such a query
as any other: :func:`dot_proxy.core.cache.cache_key`). A /0 option on *every* query is a
separate choice, which would also ask ECS-speaking upstreams not to add our own address.

Signed queries (TSIG, SIG(0)) are left as they are: changing them breaks the signature, and
their sender vouched for their options. The records and options are walked with
:mod:`dot_proxy.core.edns`'s helpers.
"""

from __future__ import annotations

from typing import Final

from dot_proxy.core.edns import OPTION_ECS, drop_options, message_layout, option_spans
from dot_proxy.errors import WireError

__all__ = ["OPTION_ECS", "has_ecs", "strip_ecs"]


_ECS_CODE: Final = OPTION_ECS.to_bytes(2, "big")
_ECS_ONLY: Final = frozenset({OPTION_ECS})


def strip_ecs(message: bytes) -> bytes:
    """The message without any ECS option in its OPT record; other options kept in order.

    Returns ``message`` itself when there is nothing to remove (no OPT record, no ECS option),
    when it is signed, or when it cannot be walked (it is passed on as it is, for the next hop
    to judge). The OPT record stays, with its flags, even when ECS was its only option.
    """
    # Cheap and sound: an ECS option always writes its code, so without those two bytes
    # anywhere there is nothing to remove and no need to walk the records.
    if _ECS_CODE not in message:
        return message
    try:
        _, opt, signed = message_layout(message)
        if opt is None or signed:
            return message
        return drop_options(message, opt, _ECS_ONLY)
    except WireError:
        return message


def has_ecs(rdata: bytes) -> bool:
    """Whether an OPT record's RDATA holds an ECS option, or options that cannot be read
    (taken for one: nothing tells what they hold)."""
    try:
        return any(code == OPTION_ECS for code, _, _ in option_spans(rdata))
    except WireError:
        return True
