"""SPKI pins (RFC 7858 §4.2), sans-I/O: compute, parse and match them.

A pin is the base64 of the SHA-256 digest of a certificate's DER-encoded SubjectPublicKeyInfo
(RFC 7858 §4.2, the same digest as RFC 7469's ``pin-sha256``). It names a key, not a
certificate, so it survives renewals that keep the key; a pin set should hold a backup pin for
the next key. Compute a server's pin with::

    openssl s_client -connect 1.1.1.1:853 -servername cloudflare-dns.com </dev/null 2>/dev/null | openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl enc -base64

The certificate is read with a minimal DER walker (RFC 5280 §4.1, X.690 §8.1) that goes only as
deep as the SubjectPublicKeyInfo: no trio, no sockets, no clock, no ASN.1 library.
"""  # noqa: E501 (the openssl recipe is meant to be copied on one line)

from __future__ import annotations

import base64
import hashlib
import string
from collections.abc import Sequence
from typing import Final

from dot_proxy.errors import DotProxyError

__all__ = [
    "PIN_PREFIX",
    "PinError",
    "matches",
    "parse_pin",
    "spki_sha256_b64",
]

#: An optional prefix on pins given by users, naming the hash as RFC 7469's ``pin-sha256``
#: does; :func:`parse_pin` strips it.
PIN_PREFIX: Final = "sha256/"

_DIGEST_SIZE: Final = hashlib.sha256().digest_size  # 32 bytes, 44 base64 characters

# X.690 §8.1.2 identifier octets of the elements walked here.
_INTEGER: Final = 0x02
_BIT_STRING: Final = 0x03
_SEQUENCE: Final = 0x30
_EXPLICIT_0: Final = 0xA0  # [0] EXPLICIT, constructed: the certificate's version
_HIGH_TAG_NUMBER: Final = 0x1F
_MAX_LENGTH_OCTETS: Final = 4  # X.509 certificates are far below 4 GiB


class PinError(DotProxyError, ValueError):
    """A pin that is not a base64 SHA-256 digest, or a certificate that is not DER X.509."""


def spki_sha256_b64(der_certificate: bytes) -> str:
    """The SPKI pin of a DER-encoded X.509 certificate (RFC 7858 §4.2).

    That is base64 (RFC 4648 §4, padded) of SHA-256 over the certificate's whole
    SubjectPublicKeyInfo element, tag and length included.

    Error handling: raises :class:`PinError` (a :class:`ValueError`) when the bytes are not a
    DER certificate as far as the SubjectPublicKeyInfo, or carry bytes after it.
    """
    digest = hashlib.sha256(_subject_public_key_info(der_certificate)).digest()
    return base64.b64encode(digest).decode("ascii")


def parse_pin(text: str) -> str:
    """Validate a pin as a user gives it and return it in canonical form.

    Accepts standard, padded base64 (RFC 4648 §4) of exactly 32 bytes, optionally prefixed by
    ``sha256/``, with surrounding whitespace ignored (pins are pasted from files and shells).
    The result is the canonical encoding of the digest, as :func:`spki_sha256_b64` writes it.

    Error handling: raises :class:`PinError` (a :class:`ValueError`) whose message says what is
    wrong, fit to show the user as it is.
    """
    pin = text.strip().removeprefix(PIN_PREFIX)
    if not pin:
        raise PinError("empty SPKI pin: expected the base64 SHA-256 digest of a public key")
    try:
        digest = base64.b64decode(pin, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise PinError(f"SPKI pin {text!r} is not standard base64: {exc}{_hint(pin)}") from exc
    if len(digest) != _DIGEST_SIZE:
        raise PinError(
            f"SPKI pin {text!r} decodes to {len(digest)} bytes, a SHA-256 pin to "
            f"{_DIGEST_SIZE} (44 base64 characters){_hint(pin)}"
        )
    return base64.b64encode(digest).decode("ascii")


def matches(pins: frozenset[str] | tuple[str, ...], der_certificates: Sequence[bytes]) -> bool:
    """Whether any certificate of a chain carries a key whose pin is in ``pins``.

    ``pins`` are canonical pins, as :func:`parse_pin` returns them; an empty set matches
    nothing (callers skip the check for upstreams without pins). RFC 7858 §4.2 lets a pin name
    any key in the chain, leaf or CA. A certificate that cannot be parsed matches nothing: it
    cannot carry a pinned key, and one bad certificate must not hide a good one.
    """
    if not pins:
        return False
    for certificate in der_certificates:
        try:
            pin = spki_sha256_b64(certificate)
        except PinError:
            continue
        if pin in pins:
            return True
    return False


# --- DER -----------------------------------------------------------------------------------


def _subject_public_key_info(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo element of a certificate, tag and length included.

    RFC 5280 §4.1: Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature };
    TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity, subject, subjectPublicKeyInfo, ... }.
    """
    body, end = _expect(der, 0, len(der), _SEQUENCE, "Certificate")
    if end != len(der):
        raise PinError(f"{len(der) - end} bytes after the certificate")
    offset, tbs_end = _expect(der, body, end, _SEQUENCE, "tbsCertificate")
    if offset < tbs_end and der[offset] == _EXPLICIT_0:  # absent in v1 certificates
        _, offset = _expect(der, offset, tbs_end, _EXPLICIT_0, "version")
    for tag, what in (
        (_INTEGER, "serialNumber"),
        (_SEQUENCE, "signature"),
        (_SEQUENCE, "issuer"),
        (_SEQUENCE, "validity"),
        (_SEQUENCE, "subject"),
    ):
        _, offset = _expect(der, offset, tbs_end, tag, what)
    spki_start = offset
    content, spki_end = _expect(der, offset, tbs_end, _SEQUENCE, "subjectPublicKeyInfo")
    # SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT
    # STRING }: check its shape, so that a pin is never computed over something else.
    _, offset = _expect(der, content, spki_end, _SEQUENCE, "algorithm")
    _, offset = _expect(der, offset, spki_end, _BIT_STRING, "subjectPublicKey")
    if offset != spki_end:
        raise PinError("extra data in subjectPublicKeyInfo")
    return der[spki_start:spki_end]


def _expect(der: bytes, offset: int, limit: int, tag: int, what: str) -> tuple[int, int]:
    """Read the element at ``offset`` that must have ``tag``; return its content's bounds."""
    found, start, end = _read_tlv(der, offset, limit, what)
    if found != tag:
        raise PinError(f"expected {what} (tag 0x{tag:02x}), found tag 0x{found:02x}")
    return start, end


def _read_tlv(der: bytes, offset: int, limit: int, what: str) -> tuple[int, int, int]:
    """One DER element inside ``der[:limit]``: its tag, content start and end (X.690 §8.1)."""
    if offset + 2 > limit:
        raise PinError(f"truncated DER: {what} header runs past its container")
    tag, first = der[offset], der[offset + 1]
    if tag & _HIGH_TAG_NUMBER == _HIGH_TAG_NUMBER:
        raise PinError(f"expected {what}, found a high-tag-number DER element")
    start = offset + 2
    if first < 0x80:  # X.690 §8.1.3.4: short form
        length = first
    else:
        octets = first & 0x7F
        # X.690 §10.1: DER uses the definite form with the fewest octets.
        if octets == 0:
            raise PinError(f"{what} has an indefinite length, which is not DER")
        if octets > _MAX_LENGTH_OCTETS:
            raise PinError(f"{what} has a {octets}-octet length, too long for a certificate")
        if start + octets > limit:
            raise PinError(f"truncated DER: {what} length runs past its container")
        length = int.from_bytes(der[start : start + octets], "big")
        if der[start] == 0 or length < 0x80:
            raise PinError(f"{what} length is not in its shortest form, which DER requires")
        start += octets
    end = start + length
    if end > limit:
        raise PinError(f"truncated DER: {what} runs past its container")
    return tag, start, end


def _hint(pin: str) -> str:
    """A likely cause of a bad pin, for the error message."""
    if len(pin) == 2 * _DIGEST_SIZE and all(c in string.hexdigits for c in pin):
        return "; this looks like hex, pins are base64 (openssl enc -base64)"
    if "-" in pin or "_" in pin:
        return "; use the standard base64 alphabet (+ and /), not the URL-safe one"
    return ""
