"""dot-proxy: a DNS-over-TLS forwarding proxy (plain DNS in, RFC 7858 out), built on trio."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
