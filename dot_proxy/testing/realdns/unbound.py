"""unbound serving the zone over DoT and plain DNS: the upstream of every forwarder here; and
the ``unbound.conf`` pieces it shares with the unbound forwarder.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import dns.rcode

from dot_proxy.testing.realdns.pki import Pki
from dot_proxy.testing.realdns.queries import dot_query
from dot_proxy.testing.realdns.server import _Server
from dot_proxy.testing.realdns.tools import LOOPBACK, RealDnsError, _require_tool, free_port
from dot_proxy.testing.realdns.zone import Zone, write_zone


def _unbound_common(workdir: Path, verbosity: int) -> list[str]:
    """The ``server:`` settings every unbound here shares: in the foreground, logging to
    stderr, no privileges dropped, no validation, one thread, room for many TCP clients."""
    return [
        "do-daemonize: no",
        "use-syslog: no",
        'logfile: ""',  # stderr, which goes to log_file
        f"verbosity: {verbosity}",
        'username: ""',
        'chroot: ""',
        f'directory: "{workdir}"',
        'pidfile: ""',
        "access-control: 127.0.0.0/8 allow",
        "access-control: ::1 allow",
        "num-threads: 1",
        'module-config: "iterator"',
        # The default of 10 TCP/TLS clients per thread would throttle a benchmark
        # (dnsperf -m dot alone opens one connection per client).
        "incoming-num-tcp: 1000",
        # Long-lived connections are what the forwarders under test should get (ms).
        "tcp-idle-timeout: 120000",
        "num-queries-per-thread: 4096",
    ]


def _unbound_config(
    settings: Sequence[str], *, sections: Sequence[str] = (), control_port: int = 0
) -> str:
    """An unbound.conf: ``settings`` under ``server:``, then ``sections`` (whole clauses), then
    ``remote-control:``, on ``control_port`` of loopback (no certificates) or off when 0."""
    body = "\n".join("    " + line for line in settings)
    control = ["control-enable: no"]
    if control_port:
        control = [
            "control-enable: yes",
            f"control-interface: {LOOPBACK}",
            f"control-port: {control_port}",
            "control-use-cert: no",
        ]
    clauses = [f"server:\n{body}\n", *sections, "remote-control:\n"]
    return "".join(clauses) + "".join(f"    {line}\n" for line in control)


class Unbound(_Server):
    """unbound serving ``Zone`` over DoT on ``tls_port`` and plain DNS on ``plain_port``.

    The container runs as root: unbound would drop privileges to user ``unbound`` and chroot,
    and then fail to read the key in our temp dir; ``username: ""`` and ``chroot: ""`` keep it
    as it is. It neither recurses (names outside ``test.`` are refused) nor validates
    (``module-config: "iterator"``), so it needs no root hints or trust anchor.
    """

    name = "unbound"

    def __init__(
        self,
        pki: Pki,
        zone: Zone | None = None,
        *,
        workdir: Path | str | None = None,
        extra_config: Sequence[str] = (),
        verbosity: int = 1,
        ipv6: bool = False,
        control: bool = False,
        attempts: int = 3,
    ) -> None:
        super().__init__(workdir=workdir, attempts=attempts)
        self.pki = pki
        self.zone = zone or Zone()
        self.ipv6 = ipv6  # also listen on ::1, same ports (the certificate names ::1 too)
        self.extra_config = tuple(extra_config)
        self.verbosity = verbosity
        self.control = control  # unbound-control on a loopback port, for statistics()
        self.tls_port = 0
        self.plain_port = 0
        self.control_port = 0
        self.config_file = self.workdir / "unbound.conf"
        self.zone_file = write_zone(self.workdir / "zone.conf", self.zone)

    @property
    def upstream_spec(self) -> str:
        """This server as dot-proxy's ``--upstream`` value."""
        return f"{LOOPBACK}:{self.tls_port}#{self.pki.auth_name}"

    @property
    def upstream_spec_v6(self) -> str:
        """The same over ::1 (needs ``ipv6=True``)."""
        return f"[::1]:{self.tls_port}#{self.pki.auth_name}"

    def _prepare(self) -> list[str]:
        # unbound also opens UDP on the TLS port. With ipv6, ::1 may hold the port already:
        # then unbound exits at once and start() retries with new ports.
        self.tls_port = free_port("both")
        self.plain_port = free_port("both")
        self.control_port = free_port("tcp") if self.control else 0
        self.config_file.write_text(self.config_text())
        return [_require_tool("unbound"), "-d", "-c", str(self.config_file)]

    @property
    def ports(self) -> tuple[int, int]:
        return (self.tls_port, self.plain_port)

    def config_text(self) -> str:
        hosts = [LOOPBACK, "::1"] if self.ipv6 else [LOOPBACK]
        settings = [
            *(f"interface: {host}@{port}" for host in hosts for port in self.ports),
            f"tls-port: {self.tls_port}",
            f'tls-service-key: "{self.pki.key_file}"',
            f'tls-service-pem: "{self.pki.cert_file}"',
            *_unbound_common(self.workdir, self.verbosity),
            f"do-ip6: {'yes' if self.ipv6 else 'no'}",
            f'include: "{self.zone_file}"',
            *self.extra_config,
        ]
        return _unbound_config(settings, control_port=self.control_port)

    def statistics(self) -> dict[str, float]:
        """unbound's counters now (``unbound-control stats_noreset``; needs ``control=True``),
        e.g. ``total.num.queries``: every query it has been asked since it started.

        Error handling: ``RealDnsError`` if unbound-control fails or prints no counters.
        """
        if not self.control:
            raise RealDnsError("statistics() needs Unbound(control=True)")
        argv = [_require_tool("unbound-control"), "-c", str(self.config_file), "stats_noreset"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        counters = {}
        for line in done.stdout.splitlines():
            key, _, value = line.partition("=")
            with contextlib.suppress(ValueError):
                counters[key] = float(value)
        if done.returncode != 0 or not counters:
            raise RealDnsError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr}")
        return counters

    def _probe(self) -> None:
        answer = dot_query(self.tls_port, self.zone.host(0), pki=self.pki, timeout=1.0)
        if answer.rcode() != dns.rcode.NOERROR:
            raise RealDnsError(f"probe answered {dns.rcode.to_text(answer.rcode())}")
