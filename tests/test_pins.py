"""Pure tests of :mod:`dot_proxy.core.pins`: trustme certificates, ``cryptography`` as the oracle.

``cryptography`` (a dependency of trustme) re-encodes each certificate's public key as a
SubjectPublicKeyInfo; our DER walker must find the very same bytes in the certificate. The
openssl recipe in the module docstring is run for real on a certificate file, so the
documentation cannot drift from the code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dot_proxy.core.pins
from dot_proxy.core.pins import PIN_PREFIX, PinError, matches, parse_pin, spki_sha256_b64
from dot_proxy.errors import DotProxyError

SOME = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# trustme 1.2 offers RSA (2048) and ECDSA (P-256).
KEY_TYPES = [trustme.KeyType.RSA, trustme.KeyType.ECDSA]


def oracle_pin(der: bytes) -> str:
    """The pin as cryptography computes it: SHA-256 of the re-encoded public key."""
    key = x509.load_der_x509_certificate(der).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def der_of(blob: trustme.Blob) -> bytes:
    return x509.load_pem_x509_certificate(blob.bytes()).public_bytes(serialization.Encoding.DER)


class Chain:
    """A trustme CA, an intermediate and a leaf, all as DER."""

    def __init__(self, key_type: trustme.KeyType) -> None:
        self.ca = trustme.CA(key_type=key_type)
        self.intermediate = self.ca.create_child_ca(key_type=key_type)
        leaf = self.intermediate.issue_cert("dns.example", "192.0.2.53", key_type=key_type)
        self.leaf_pem = leaf.cert_chain_pems[0]
        self.leaf = der_of(self.leaf_pem)
        self.ca_der = der_of(self.ca.cert_pem)
        self.intermediate_der = der_of(self.intermediate.cert_pem)
        self.all = [self.leaf, self.intermediate_der, self.ca_der]


@pytest.fixture(scope="module", params=KEY_TYPES, ids=lambda k: k.name)
def chain(request: pytest.FixtureRequest) -> Chain:
    key_type: trustme.KeyType = request.param
    return Chain(key_type)


@pytest.fixture(scope="module")
def rsa_chain() -> Chain:
    return Chain(trustme.KeyType.RSA)


@pytest.fixture(scope="module")
def ec_chain() -> Chain:
    return Chain(trustme.KeyType.ECDSA)


# --- spki_sha256_b64 -----------------------------------------------------------------------


def test_pin_of_every_certificate_in_the_chain_matches_cryptography(chain: Chain) -> None:
    for der in chain.all:
        pin = spki_sha256_b64(der)
        assert pin == oracle_pin(der)
        assert len(pin) == 44
        assert parse_pin(pin) == pin


def test_pins_of_different_keys_differ(chain: Chain) -> None:
    assert len({spki_sha256_b64(der) for der in chain.all}) == 3


def test_pin_of_a_v1_certificate_without_version_field(rsa_chain: Chain) -> None:
    # RFC 5280 §4.1.2.1: v1 certificates leave out the [0] version; rebuild the leaf without it
    # (the signature no longer verifies, which does not matter to the pin).
    der = rsa_chain.leaf
    _, tbs_start, cert_end = read_tlv(der, 0)
    _, body_start, tbs_end = read_tlv(der, tbs_start)
    tag, _, version_end = read_tlv(der, body_start)
    assert tag == 0xA0
    tbs = encode_tlv(0x30, der[version_end:tbs_end])
    v1 = encode_tlv(0x30, tbs + der[tbs_end:cert_end])
    assert spki_sha256_b64(v1) == spki_sha256_b64(der)


def test_openssl_recipe_in_the_docstring_gives_the_same_pin(chain: Chain, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    recipe = next(
        line.strip()
        for line in (dot_proxy.core.pins.__doc__ or "").splitlines()
        if "s_client" in line
    )
    stages = [stage.strip() for stage in recipe.split("|")]
    assert stages[0].startswith("openssl s_client")
    # Every stage but the network one, on a certificate file instead of a live server.
    cert = tmp_path / "leaf.pem"
    chain.leaf_pem.write_to_path(str(cert))
    offline = " | ".join([f"openssl x509 -in {cert} -pubkey -noout", *stages[2:]])
    assert stages[1] == "openssl x509 -pubkey -noout"
    result = subprocess.run(
        ["sh", "-c", offline], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == spki_sha256_b64(chain.leaf)


# --- malformed DER ---------------------------------------------------------------------------


def test_every_truncation_of_a_certificate_is_rejected(ec_chain: Chain) -> None:
    der = ec_chain.leaf
    for size in range(len(der)):
        with pytest.raises(PinError):
            spki_sha256_b64(der[:size])


def test_trailing_bytes_are_rejected(ec_chain: Chain) -> None:
    with pytest.raises(PinError, match="after the certificate"):
        spki_sha256_b64(ec_chain.leaf + b"\x00")


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"", "truncated"),
        (b"\x31\x00", "expected Certificate"),
        (b"\x30\x80\x00\x00", "indefinite"),
        (b"\x30\x81\x05" + bytes(5), "shortest form"),
        (b"\x30\x82\x00\x80" + bytes(128), "shortest form"),
        (b"\x30\x85" + bytes(5), "too long"),
        (b"\x1f\x00", "high-tag-number"),
        (b"\x30\x00", "truncated"),
        (b"\x30\x02\x30\x00", "truncated DER: serialNumber"),
        (b"\x30\x04\x30\x02\x30\x00", "expected serialNumber"),
        (b"\x30\x05\x30\x03\xa0\x01\x00", "truncated DER: serialNumber"),
    ],
)
def test_malformed_der_is_rejected_with_a_reason(der: bytes, message: str) -> None:
    with pytest.raises(PinError, match=message):
        spki_sha256_b64(der)


def test_extra_element_inside_subject_public_key_info_is_rejected(ec_chain: Chain) -> None:
    der = ec_chain.leaf
    spki = spki_element(der)
    _, content, end = read_tlv(spki, 0)
    bad_spki = encode_tlv(0x30, spki[content:end] + b"\x05\x00")
    with pytest.raises(PinError, match="extra data"):
        spki_sha256_b64(replace_spki(der, bad_spki))


@SOME
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_pin_error(data: bytes) -> None:
    with contextlib.suppress(PinError):
        spki_sha256_b64(data)


@SOME
@given(st.data())
def test_mangled_certificates_raise_only_pin_error_or_agree_with_cryptography(
    rsa_chain: Chain, data: st.DataObject
) -> None:
    cert = bytearray(rsa_chain.leaf)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(cert) - 1))
        cert[where] = data.draw(st.sampled_from([0x00, 0x02, 0x30, 0x7F, 0x80, 0x81, 0x84, 0xFF]))
    try:
        pin = spki_sha256_b64(bytes(cert))
    except PinError:
        return
    try:
        expected = oracle_pin(bytes(cert))
    except Exception:  # ValueError, UnsupportedAlgorithm, InvalidVersion, ...
        return  # broken somewhere we do not read (extensions, signature) or in the key itself
    assert pin == expected


def test_pin_error_is_both_value_error_and_ours() -> None:
    assert issubclass(PinError, ValueError)
    assert issubclass(PinError, DotProxyError)


# --- parse_pin -------------------------------------------------------------------------------

digests = st.binary(min_size=32, max_size=32)


@SOME
@given(digests)
def test_parse_pin_accepts_base64_of_32_bytes(digest: bytes) -> None:
    pin = base64.b64encode(digest).decode("ascii")
    assert parse_pin(pin) == pin
    assert parse_pin(PIN_PREFIX + pin) == pin
    assert parse_pin(f"  {pin}\n") == pin


def test_parse_pin_canonicalises_unused_bits() -> None:
    # The 44th character carries 4 bits of the digest and 2 unused bits; "B" sets one of those.
    assert parse_pin("A" * 42 + "B=") == "A" * 43 + "="


@SOME
@given(st.binary(max_size=64).filter(lambda b: len(b) != 32))
def test_parse_pin_rejects_other_lengths(raw: bytes) -> None:
    text = base64.b64encode(raw).decode("ascii")
    with pytest.raises(PinError, match="empty" if not raw else f"decodes to {len(raw)} bytes"):
        parse_pin(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("sha256/", "empty"),
        ("A" * 43, "not standard base64"),  # padding missing
        ("A" * 42 + "==", "decodes to 31"),
        ("A" * 43 + "==", "not standard base64"),
        ("A" * 20 + " " + "A" * 22 + "=", "not standard base64"),
        ("A" * 42 + "-_", "URL-safe"),
        ("A" * 42 + "é=", "not standard base64"),
        ("ab" * 32, "looks like hex"),
        ("sha512/" + "A" * 43 + "=", "not standard base64"),
    ],
)
def test_parse_pin_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(PinError, match=message):
        parse_pin(text)


@SOME
@given(st.text(max_size=60))
def test_parse_pin_on_any_text_returns_a_canonical_pin_or_raises_pin_error(text: str) -> None:
    try:
        pin = parse_pin(text)
    except PinError:
        return
    assert len(base64.b64decode(pin, validate=True)) == 32
    assert parse_pin(pin) == pin


# --- matches ---------------------------------------------------------------------------------


def test_matches_any_certificate_of_the_chain(chain: Chain) -> None:
    for der in chain.all:
        assert matches(frozenset({spki_sha256_b64(der)}), chain.all)
        assert matches((spki_sha256_b64(der),), [der])


def test_backup_pin_alone_matches(chain: Chain, ec_chain: Chain) -> None:
    backup = base64.b64encode(hashlib.sha256(b"next key").digest()).decode("ascii")
    pins = frozenset({backup, spki_sha256_b64(chain.leaf)})
    assert matches(pins, [chain.leaf])
    assert not matches(frozenset({backup}), chain.all)


def test_no_match_for_another_chain(rsa_chain: Chain, ec_chain: Chain) -> None:
    pins = frozenset(spki_sha256_b64(der) for der in rsa_chain.all)
    assert not matches(pins, ec_chain.all)
    assert matches(pins, [*ec_chain.all, rsa_chain.ca_der])


def test_empty_pins_or_empty_chain_never_match(rsa_chain: Chain) -> None:
    assert not matches(frozenset(), rsa_chain.all)
    assert not matches(frozenset({spki_sha256_b64(rsa_chain.leaf)}), [])


def test_a_malformed_certificate_does_not_hide_a_good_one(rsa_chain: Chain) -> None:
    pins = (spki_sha256_b64(rsa_chain.ca_der),)
    assert matches(pins, [b"garbage", rsa_chain.leaf[:-1], rsa_chain.ca_der])
    assert not matches(pins, [b"garbage"])


# --- helpers ---------------------------------------------------------------------------------


def read_tlv(der: bytes, offset: int) -> tuple[int, int, int]:
    """Test-side DER reader for building variants (tag, content start, end)."""
    tag, first = der[offset], der[offset + 1]
    start = offset + 2
    if first < 0x80:
        return tag, start, start + first
    octets = first & 0x7F
    length = int.from_bytes(der[start : start + octets], "big")
    return tag, start + octets, start + octets + length


def encode_tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def tbs_children(der: bytes) -> list[tuple[int, int]]:
    """(start, end) of every element of the tbsCertificate."""
    _, tbs_start, _ = read_tlv(der, 0)
    _, offset, tbs_end = read_tlv(der, tbs_start)
    children = []
    while offset < tbs_end:
        _, _, end = read_tlv(der, offset)
        children.append((offset, end))
        offset = end
    return children


def spki_element(der: bytes) -> bytes:
    start, end = tbs_children(der)[6]  # version, serial, signature, issuer, validity, subject
    return der[start:end]


def replace_spki(der: bytes, spki: bytes) -> bytes:
    children = tbs_children(der)
    _, tbs_start, cert_end = read_tlv(der, 0)
    _, _, tbs_end = read_tlv(der, tbs_start)
    parts = [der[s:e] for s, e in children]
    parts[6] = spki
    tbs = encode_tlv(0x30, b"".join(parts))
    return encode_tlv(0x30, tbs + der[tbs_end:cert_end])


def test_spki_helper_finds_what_cryptography_encodes(ec_chain: Chain) -> None:
    key = x509.load_der_x509_certificate(ec_chain.leaf).public_key()
    expected = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki_element(ec_chain.leaf) == expected
