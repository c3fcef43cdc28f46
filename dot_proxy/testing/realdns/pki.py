"""A trustme PKI on disk: a CA and one server certificate for ``dns.test`` and the loopback
addresses, which every DoT server here presents and every client here checks.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from dot_proxy.testing.realdns.tools import AUTH_NAME


@dataclass(frozen=True, slots=True)
class Pki:
    """A trustme CA and one server certificate for ``dns.test``, 127.0.0.1 and ::1, on disk."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path  # server certificate chain (leaf first)
    key_file: Path
    auth_name: str = AUTH_NAME

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks the host name."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def make_pki(directory: Path | str) -> Pki:
    """Create a CA and a server certificate; write ``ca.pem``, ``server.pem``, ``server.key``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(AUTH_NAME, "127.0.0.1", "::1")
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    return Pki(ca=ca, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
