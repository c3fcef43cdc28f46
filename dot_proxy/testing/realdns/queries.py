"""One DNS query from Python (dnspython) over UDP, TCP or DoT to a server on loopback: the
probes that tell when a server is up, and the tests' own client.
"""

from __future__ import annotations

import dns.message
import dns.query

from dot_proxy.testing.realdns.pki import Pki
from dot_proxy.testing.realdns.tools import LOOPBACK


def udp_query(
    port: int, qname: str, rdtype: str = "A", *, host: str = LOOPBACK, timeout: float = 2.0
) -> dns.message.Message:
    """One query over UDP (no EDNS); raises ``dns.exception.Timeout`` if nothing comes back."""
    return dns.query.udp(dns.message.make_query(qname, rdtype), host, timeout=timeout, port=port)


def tcp_query(
    port: int, qname: str, rdtype: str = "A", *, host: str = LOOPBACK, timeout: float = 2.0
) -> dns.message.Message:
    """One query over plain TCP."""
    return dns.query.tcp(dns.message.make_query(qname, rdtype), host, timeout=timeout, port=port)


def dot_query(
    port: int,
    qname: str,
    rdtype: str = "A",
    *,
    pki: Pki,
    host: str = LOOPBACK,
    timeout: float = 2.0,
) -> dns.message.Message:
    """One query over DNS-over-TLS, verifying the server against ``pki`` and ``dns.test``."""
    query = dns.message.make_query(qname, rdtype)
    return dns.query.tls(
        query,
        host,
        timeout=timeout,
        port=port,
        ssl_context=pki.client_context(),
        server_hostname=pki.auth_name,
    )
