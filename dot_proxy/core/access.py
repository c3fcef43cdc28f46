"""Who may query, and how fast: the access list and the per-network rate limit. Pure.

A DNS proxy listening on every interface must never become an open resolver (RFC 5358); the
default list, like dnsdist's, admits loopback and private networks only. The rate limit is a
token bucket per client network (/24 for IPv4, /56 for IPv6, as dnsproxy), with the clock
passed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DEFAULT_ALLOW", "AccessList", "RateLimiter", "client_network"]

DEFAULT_ALLOW = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
# Verdicts and buckets are kept per address or network; past this many, start afresh rather
# than let a scan of spoofed sources grow memory without bound.
_MAX_TRACKED = 65536

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 scope (fe80::1%eth0)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AccessList:
    """Client networks allowed to query; lookups are cached per source address."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(text, strict=False) for text in networks
        )
        self._verdicts: dict[str, bool] = {}

    @property
    def is_open(self) -> bool:
        """Whether every IPv4 or every IPv6 address is allowed (an open resolver)."""
        return any(network.prefixlen == 0 for network in self.networks)

    def allows(self, host: str) -> bool:
        """Whether a client at ``host`` (an address string from the socket) may query."""
        verdict = self._verdicts.get(host)
        if verdict is None:
            try:
                address = _address(host)
            except ValueError:
                return False
            verdict = any(address in network for network in self.networks)
            if len(self._verdicts) >= _MAX_TRACKED:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict


def client_network(host: str) -> str:
    """The network a client is rate limited as: its /24 (IPv4) or /56 (IPv6)."""
    address = _address(host)
    prefix = 24 if address.version == 4 else 56
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client network: ``rate`` queries a second, bursts of one second's."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._buckets: dict[str, _Bucket] = {}
        self._networks: dict[str, str] = {}
        self.limited = 0

    def allow(self, host: str, now: float) -> bool:
        """Take a token for a query from ``host``; False if its network is over the limit."""
        network = self._networks.get(host)
        if network is None:
            try:
                network = client_network(host)
            except ValueError:
                return False
            if len(self._networks) >= _MAX_TRACKED:
                self._networks.clear()
            self._networks[host] = network
        bucket = self._buckets.get(network)
        if bucket is None:
            if len(self._buckets) >= _MAX_TRACKED:
                self._buckets.clear()
            bucket = self._buckets[network] = _Bucket(self.rate, now)
        else:
            bucket.tokens = min(self.rate, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        self.limited += 1
        return False
