"""The DoT forwarders measured against each other, each in front of an :class:`Unbound`:
stubby, dnsdist, unbound as a caching forwarder, and dot-proxy itself (``python -m dot_proxy``).
"""

from __future__ import annotations

import abc
import importlib.util
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import dns.rcode

from dot_proxy.testing.realdns.pki import Pki
from dot_proxy.testing.realdns.queries import udp_query
from dot_proxy.testing.realdns.server import _Server
from dot_proxy.testing.realdns.tools import LOOPBACK, RealDnsError, _require_tool, free_port
from dot_proxy.testing.realdns.unbound import _unbound_common, _unbound_config


class _Forwarder(_Server):
    """A plain-DNS-in, DoT-out forwarder listening on ``port`` (UDP and TCP).

    ``start()`` waits for a NOERROR answer to ``probe_name`` over UDP, i.e. for the whole
    path to the upstream. With ``probe_name=None`` it only waits until the TCP port accepts
    a connection: for a forwarder whose upstream is meant to be unreachable or wrong.
    """

    def __init__(
        self,
        pki: Pki,
        *,
        probe_name: str | None = "h0.test.",
        workdir: Path | str | None = None,
        attempts: int = 3,
    ) -> None:
        super().__init__(workdir=workdir, attempts=attempts)
        self.pki = pki
        self.probe_name = probe_name
        self.port = 0

    def _probe(self) -> None:
        if self.probe_name is None:
            socket.create_connection((LOOPBACK, self.port), timeout=0.5).close()
            return
        answer = udp_query(self.port, self.probe_name, timeout=0.5)
        if answer.rcode() != dns.rcode.NOERROR:
            raise RealDnsError(f"probe answered {dns.rcode.to_text(answer.rcode())}")


class _Peer(_Forwarder):
    """A forwarder to the :class:`Unbound` on ``upstream_port``, set up by one config file
    (``config_file``, written afresh with each start's port), ``extra_config`` lines last."""

    config_name: ClassVar[str]

    def __init__(
        self,
        pki: Pki,
        upstream_port: int,
        *,
        extra_config: Sequence[str] = (),
        workdir: Path | str | None = None,
        attempts: int = 3,
    ) -> None:
        super().__init__(pki, workdir=workdir, attempts=attempts)
        self.upstream_port = upstream_port
        self.extra_config = tuple(extra_config)
        self.config_file = self.workdir / self.config_name

    def _prepare(self) -> list[str]:
        self.port = free_port("both")
        self.config_file.write_text(self.config_text())
        return self._argv()

    @abc.abstractmethod
    def config_text(self) -> str:
        """The config file for the current ``port``."""

    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The command line that runs it with ``config_file``."""


class Stubby(_Peer):
    """stubby forwarding over DoT only, strict authentication against the trustme CA."""

    name = "stubby"
    config_name = "stubby.yml"

    def __init__(
        self,
        pki: Pki,
        upstream_port: int,
        *,
        extra_config: Sequence[str] = (),
        log_level: int = 5,
        workdir: Path | str | None = None,
        attempts: int = 3,
    ) -> None:
        super().__init__(
            pki, upstream_port, extra_config=extra_config, workdir=workdir, attempts=attempts
        )
        self.log_level = log_level

    def _argv(self) -> list[str]:
        return [_require_tool("stubby"), "-C", str(self.config_file), "-v", str(self.log_level)]

    def config_text(self) -> str:
        lines = [
            "resolution_type: GETDNS_RESOLUTION_STUB",
            "dns_transport_list: [GETDNS_TRANSPORT_TLS]",
            "tls_authentication: GETDNS_AUTHENTICATION_REQUIRED",
            f'tls_ca_file: "{self.pki.ca_file}"',
            "idle_timeout: 10000",  # ms; stubby's documented default configuration
            # Its own home for trust-anchor files; stubby must not write to /root or /var.
            f'appdata_dir: "{self.workdir}"',
            "listen_addresses:",
            f"  - {LOOPBACK}@{self.port}",
            "upstream_recursive_servers:",
            f"  - address_data: {LOOPBACK}",
            f"    tls_port: {self.upstream_port}",
            f'    tls_auth_name: "{self.pki.auth_name}"',
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"


class Dnsdist(_Peer):
    """dnsdist with one DoT backend, certificate validated, no console, and no packet cache
    unless ``packet_cache`` entries are asked for.

    ``--supervised`` keeps it from reading a console from stdin; it only drops privileges
    with ``-u``/``-g``, so as root it runs as is. ``setSecurityPollSuffix("")`` stops its
    security-status lookups, which would go out to the Internet.

    The packet cache (``newPacketCache(N)`` on the default pool, its other settings at their
    defaults: TTLs capped at 86400 s) keys answers by the whole query and by the transport it
    came over, so a name asked over UDP and over TCP takes two entries; and when it holds N, it
    stores nothing more until entries expire, rather than evicting: size it above what it is
    meant to hold.
    """

    name = "dnsdist"
    config_name = "dnsdist.conf"

    def __init__(
        self,
        pki: Pki,
        upstream_port: int,
        *,
        server_options: Mapping[str, str] | None = None,
        packet_cache: int = 0,
        extra_config: Sequence[str] = (),
        workdir: Path | str | None = None,
        attempts: int = 3,
    ) -> None:
        super().__init__(
            pki, upstream_port, extra_config=extra_config, workdir=workdir, attempts=attempts
        )
        self.server_options = dict(server_options or {})
        self.packet_cache = packet_cache

    def _argv(self) -> list[str]:
        return [
            _require_tool("dnsdist"),
            "--supervised",
            "--disable-syslog",
            "-C",
            str(self.config_file),
        ]

    def config_text(self) -> str:
        options = {
            "address": f'"{LOOPBACK}:{self.upstream_port}"',
            "tls": '"openssl"',
            "subjectName": f'"{self.pki.auth_name}"',
            "caStore": f'"{self.pki.ca_file}"',
            "validateCertificates": "true",
            # The default health check asks for a.root-servers.net; ask for a name we serve.
            "checkName": f'"{self.probe_name or "h0.test."}"',
            **self.server_options,
        }
        server = ", ".join(f"{key}={value}" for key, value in options.items())
        lines = [
            f'setLocal("{LOOPBACK}:{self.port}")',
            f"newServer{{{server}}}",
            'setSecurityPollSuffix("")',
            *self._cache_lines(),
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _cache_lines(self) -> list[str]:
        if not self.packet_cache:
            return []  # no cache: every query goes upstream, as with the other forwarders
        return [f"pc = newPacketCache({self.packet_cache})", 'getPool(""):setCache(pc)']


class UnboundForwarder(_Peer):
    """unbound as a caching forwarder: plain DNS in on ``port`` (UDP and TCP), the zone
    ``test.`` forwarded over DoT to ``upstream_port`` (an :class:`Unbound`), the certificate
    checked against the trustme CA and ``dns.test``. What it has answered once, it answers from
    its cache (message and RRset caches at unbound's default sizes, 4 MB each) until the TTL
    runs out.
    """

    name = "unbound-forwarder"
    config_name = "unbound-forwarder.conf"

    def __init__(
        self,
        pki: Pki,
        upstream_port: int,
        *,
        extra_config: Sequence[str] = (),
        verbosity: int = 1,
        workdir: Path | str | None = None,
        attempts: int = 3,
    ) -> None:
        super().__init__(
            pki, upstream_port, extra_config=extra_config, workdir=workdir, attempts=attempts
        )
        self.verbosity = verbosity

    def _argv(self) -> list[str]:
        return [_require_tool("unbound"), "-d", "-c", str(self.config_file)]

    def config_text(self) -> str:
        settings = [
            f"interface: {LOOPBACK}@{self.port}",
            *_unbound_common(self.workdir, self.verbosity),
            "do-ip6: no",
            # unbound refuses to send queries to 127.0.0.0/8 unless told it may.
            "do-not-query-localhost: no",
            f'tls-cert-bundle: "{self.pki.ca_file}"',
            # test. is one of RFC 6761's names unbound answers NXDOMAIN itself by default.
            'local-zone: "test." nodefault',
            *self.extra_config,
        ]
        forward = (
            "forward-zone:\n"
            '    name: "test."\n'
            f"    forward-addr: {LOOPBACK}@{self.upstream_port}#{self.pki.auth_name}\n"
            "    forward-tls-upstream: yes\n"
        )
        return _unbound_config(settings, sections=[forward])


class DotProxy(_Forwarder):
    """``python -m dot_proxy`` listening on a runtime port of 127.0.0.1.

    ``upstreams`` are ``HOST[:PORT][#AUTH_NAME]`` strings (``Unbound.upstream_spec``), passed
    as repeated ``--upstream`` flags in order; ``extra_args`` go last (e.g. ``--no-padding``).
    """

    name = "dot-proxy"

    def __init__(
        self,
        pki: Pki,
        upstreams: str | Sequence[str],
        *,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        probe_name: str | None = "h0.test.",
        workdir: Path | str | None = None,
        attempts: int = 3,
    ) -> None:
        super().__init__(pki, probe_name=probe_name, workdir=workdir, attempts=attempts)
        self.upstreams = (upstreams,) if isinstance(upstreams, str) else tuple(upstreams)
        self.extra_args = tuple(extra_args)
        self.python = python
        self.env = dict(env) if env is not None else None

    def _prepare(self) -> list[str]:
        self.port = free_port("both")
        argv = [self.python, "-m", "dot_proxy", "--listen", LOOPBACK, "--port", str(self.port)]
        for upstream in self.upstreams:
            argv += ["--upstream", upstream]
        return [*argv, "--ca-file", str(self.pki.ca_file), *self.extra_args]

    def _environment(self) -> dict[str, str] | None:
        return dot_proxy_environment(self.env)


def dot_proxy_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m dot_proxy`` child: this one, plus ``extra``, with
    ``PYTHONPATH`` leading to the dot_proxy this process imports.

    The child runs in its temp dir, where ``-m dot_proxy`` would find nothing unless the
    package is installed: point it at the copy this process would import, so a test run from a
    checkout exercises that checkout, and a benchmark the copy it reports.
    """
    env = {**os.environ, **(extra or {})}
    spec = importlib.util.find_spec("dot_proxy")
    if spec is not None and spec.submodule_search_locations:
        source = str(Path(next(iter(spec.submodule_search_locations))).parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    return env
