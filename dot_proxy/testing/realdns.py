"""Real DNS software as subprocesses, for end-to-end tests and the benchmark.

Everything here runs on loopback only, on ports chosen at run time:

- a trustme PKI (``make_pki``) for the name ``dns.test`` and the loopback addresses;
- a local zone ``test.`` (``Zone``, ``write_zone``, ``write_queries``);
- ``Unbound`` serving that zone over DoT (and plain DNS), the upstream of everything else;
- ``Stubby``, ``Dnsdist``, ``UnboundForwarder`` and ``DotProxy``: DoT forwarders to that
  unbound, each verifying its certificate against the trustme CA and the name ``dns.test``
  (dnsdist with or without its packet cache; the unbound forwarder caches);
- ``run_dnsperf``, query files (``write_queries``, ``write_cache_queries``) and ``/proc``
  sampling (``sample_process``) for the benchmark.

No pytest here: ``tests/e2e/conftest.py`` and ``bench/run_bench.py`` both import this module.
Each server class is a context manager; ``start()`` returns only once the server answers.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import ClassVar, Literal, Self

import dns.message
import dns.query
import dns.rcode
import trustme

AUTH_NAME = "dns.test"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 10.0


class RealDnsError(Exception):
    """A real DNS program could not be started, configured or run."""


class ToolMissingError(RealDnsError):
    """A program this helper needs is not installed (see ``missing_tools``)."""


# Debian installs daemons (unbound, dnsdist) in /usr/sbin, which is not on an unprivileged
# user's PATH: look there too, after PATH.
SYSTEM_TOOL_DIRS: tuple[str, ...] = ("/usr/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """The path of program ``name`` on PATH or in ``SYSTEM_TOOL_DIRS``, or ``None``."""
    search = [os.environ.get("PATH", os.defpath), *SYSTEM_TOOL_DIRS]
    return shutil.which(name, path=os.pathsep.join(search))


def missing_tools(*names: str) -> list[str]:
    """Return those of ``names`` that ``find_tool`` cannot find (e.g. ``"unbound"``)."""
    return [name for name in names if find_tool(name) is None]


def _require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise ToolMissingError(f"{name} is not installed (Debian package: {name})")
    return path


# --- PKI ---------------------------------------------------------------------------------------


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


# --- ports -------------------------------------------------------------------------------------

PortKind = Literal["tcp", "udp", "both"]


def free_port(kind: PortKind = "both", host: str = LOOPBACK) -> int:
    """Return a port on ``host`` that is free right now for TCP, UDP or both.

    Resource handling: the probe sockets are closed before returning, so another process may
    take the port before the caller binds it; the server classes retry with a new port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    first_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    for _ in range(100):
        with socket.socket(family, first_type) as first:
            first.bind((host, 0))
            port: int = first.getsockname()[1]
            if kind != "both":
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as second:
                try:
                    second.bind((host, port))
                except OSError:
                    continue  # taken for UDP: try another
                return port
    raise RealDnsError(f"no port free for {kind} on {host}")


@contextlib.contextmanager
def closed_port(host: str = LOOPBACK) -> Iterator[int]:
    """A TCP port on ``host`` that refuses connections for as long as the block runs.

    The port is bound and never listened on: a connection to it is refused, and no other
    process can take it meanwhile (nor can a connection use it as its own source port and
    connect to itself), as it could a port that :func:`free_port` merely found free.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


# --- the zone ----------------------------------------------------------------------------------


def _txt_rdata(label: str, index: int, length: int = 60) -> str:
    return f"{label}-{index:02d}-".ljust(length, "x")


@dataclass(frozen=True, slots=True)
class Zone:
    """The local zone unbound serves: ``h0.test`` .. ``h{hosts-1}.test`` and a few special names.

    - every host has A (198.18.0.0/15, RFC 2544) and AAAA (2001:db8::/32); every
      ``txt_every``-th host also has a short TXT;
    - ``big.test`` TXT: 30 records of 60 bytes, about 2.2 kB on the wire (over 1,232);
    - ``mid.test`` TXT: 11 records of 60 bytes, about 830 bytes (over 512, under 1,232);
    - any other name under ``test.`` is NXDOMAIN (``static`` zone), e.g. ``nx7.test``;
    - names outside ``test.`` are REFUSED at once (``local-zone: "." refuse``) rather than
      sent off to root servers this sandbox cannot reach, which would hang until SERVFAIL.

    Another ``origin`` makes another zone with the same shape (``h7.corp.example``): a
    second unbound serving it stands for a company's resolver in the split-DNS tests, and
    ``address_base`` (the second octet of its A records) tells its answers from the first's.
    """

    origin: str = "test."
    hosts: int = 3000
    txt_every: int = 10
    big_records: int = 30
    mid_records: int = 11
    ttl: int = 300
    address_base: int = 18

    @property
    def big_name(self) -> str:
        return f"big.{self.origin}"

    @property
    def mid_name(self) -> str:
        return f"mid.{self.origin}"

    def host(self, index: int) -> str:
        return f"h{index}.{self.origin}"

    def nxdomain_name(self, index: int) -> str:
        return f"nx{index}.{self.origin}"

    def a_address(self, index: int) -> str:
        return f"198.{self.address_base + index // 65536 % 2}.{index // 256 % 256}.{index % 256}"

    @staticmethod
    def aaaa_address(index: int) -> str:
        return f"2001:db8::{index:x}"

    def unbound_lines(self) -> list[str]:
        """The ``local-zone``/``local-data`` lines of the zone, for an unbound ``server:``."""
        lines = [f'local-zone: "{self.origin}" static', 'local-zone: "." refuse']
        for index in range(self.hosts):
            name = self.host(index)
            lines.append(f'local-data: "{name} {self.ttl} IN A {self.a_address(index)}"')
            lines.append(f'local-data: "{name} {self.ttl} IN AAAA {self.aaaa_address(index)}"')
            if index % self.txt_every == 0:
                lines.append(f"local-data: '{name} {self.ttl} IN TXT \"host {index}\"'")
        for name, label, count in (
            (self.big_name, "big", self.big_records),
            (self.mid_name, "mid", self.mid_records),
        ):
            for index in range(count):
                rdata = _txt_rdata(label, index)
                lines.append(f"local-data: '{name} {self.ttl} IN TXT \"{rdata}\"'")
        return lines


def write_zone(path: Path | str, zone: Zone | None = None) -> Path:
    """Write the zone as an unbound ``include:`` file (it starts with ``server:``)."""
    path = Path(path)
    body = "\n".join("    " + line for line in (zone or Zone()).unbound_lines())
    path.write_text(f"server:\n{body}\n")
    return path


def write_queries(
    path: Path | str,
    zone: Zone | None = None,
    *,
    count: int = 20_000,
    seed: int = 853,
    nxdomain_share: float = 0.1,
) -> Path:
    """Write a dnsperf query file: A, AAAA and TXT of hosts, plus NXDOMAIN names.

    Mix: about 50% A, 30% AAAA, 10% TXT (on hosts that have one), ``nxdomain_share``
    NXDOMAIN. ``big.test``/``mid.test`` are left out: dnsperf sends no EDNS, so over UDP
    they would come back truncated and the runs would measure truncation, not forwarding.
    """
    zone = zone or Zone()
    rng = random.Random(seed)  # a fixed seed: every run and every system sees the same file
    lines = []
    for _ in range(count):
        roll = rng.random()
        index = rng.randrange(zone.hosts)
        if roll < nxdomain_share:
            lines.append(f"{zone.nxdomain_name(index)} A")
        elif roll < nxdomain_share + 0.1:
            lines.append(f"{zone.host(index - index % zone.txt_every)} TXT")
        elif roll < nxdomain_share + 0.4:
            lines.append(f"{zone.host(index)} AAAA")
        else:
            lines.append(f"{zone.host(index)} A")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def zone_questions(zone: Zone | None = None) -> list[str]:
    """Every question ``zone`` answers NOERROR with data, once, as dnsperf lines
    (``"h7.test. AAAA"``): A and AAAA of every host, TXT of every ``txt_every``-th.

    ``big.test``/``mid.test`` are left out, as in :func:`write_queries`.
    """
    zone = zone or Zone()
    questions = []
    for index in range(zone.hosts):
        name = zone.host(index)
        questions += [f"{name} A", f"{name} AAAA"]
        if index % zone.txt_every == 0:
            questions.append(f"{name} TXT")
    return questions


def write_cache_queries(
    directory: Path | str, zone: Zone | None = None, *, hits: int = 100
) -> tuple[Path, Path]:
    """Write two dnsperf files for measuring caches; return their paths ``(hits, fill)``.

    ``hits.txt``: ``hits`` questions spread evenly over :func:`zone_questions`, to be asked
    again and again once each has been answered. ``fill.txt``: every question of the zone once,
    the hit questions last, so that a least-recently-used cache filled from it ends up holding
    them (the ones before may have been evicted).
    """
    questions = zone_questions(zone)
    if not 0 < hits <= len(questions):
        raise ValueError(f"hits must be 1..{len(questions)}, not {hits}")
    chosen = questions[:: len(questions) // hits][:hits]
    taken = set(chosen)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hits_file, fill_file = directory / "hits.txt", directory / "fill.txt"
    hits_file.write_text("\n".join(chosen) + "\n")
    fill = [question for question in questions if question not in taken] + chosen
    fill_file.write_text("\n".join(fill) + "\n")
    return hits_file, fill_file


# --- clients (dnspython) -----------------------------------------------------------------------


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


# --- subprocess servers ------------------------------------------------------------------------


class _EarlyExitError(RealDnsError):
    """The server process exited during start-up (usually: its port was taken)."""


class _Server(abc.ABC):
    """A DNS program run as a subprocess in its own temporary directory.

    Subclasses pick their ports and write their config in ``_prepare`` (called again with
    fresh ports when a start-up attempt dies) and say in ``_probe`` what "answering" means.
    stdout and stderr go to ``log_file`` (a file, not a pipe: a pipe nobody reads fills up
    under load and stalls the server).
    """

    name: ClassVar[str]

    def __init__(self, *, workdir: Path | str | None = None, attempts: int = 3) -> None:
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix=f"realdns-{self.name}-")
            workdir = self._own_dir.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / f"{self.name}.log"
        self._attempts = attempts
        self._process: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self.returncode: int | None = None  # set by stop(): how the last process exited

    @abc.abstractmethod
    def _prepare(self) -> list[str]:
        """Choose ports, write config files; return the command line."""

    @abc.abstractmethod
    def _probe(self) -> None:
        """Raise unless the server answers one query right now."""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running process (tests may ``send_signal(SIGSTOP)`` or ``kill()`` it)."""
        if self._process is None:
            raise RealDnsError(f"{self.name} is not running")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def command(self) -> str:
        """The command line, quoted for a shell (for reports)."""
        return shlex.join(self.argv)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        """Start the process and wait until it answers.

        Error handling: an attempt whose process exits early is retried with new ports
        (``attempts`` times); a process that runs but does not answer within ``timeout`` is
        stopped and ``RealDnsError`` carries its log.
        """
        failures = []
        for _ in range(self._attempts):
            self.argv = self._prepare()
            self._spawn()
            try:
                self._wait_ready(timeout)
            except _EarlyExitError as exc:
                failures.append(str(exc))
                self.stop()
                continue
            except BaseException:
                self.stop()
                raise
            return self
        raise RealDnsError(f"{self.name} did not start:\n" + "\n".join(failures))

    def restart(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        """Stop, then start again with the same ports and config, and wait until it answers.

        For tests of a client whose server went away and came back (stale pooled
        connections). Error handling: if the port was taken meanwhile, ``RealDnsError``.
        """
        self.stop()
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        # A fresh log per attempt; a failed attempt's log is already in its error message.
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._environment(),
            )

    def _environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise _EarlyExitError(f"{self.command} exited with {code}; log:\n{self.log_text()}")
            try:
                self._probe()
            except Exception as exc:  # any failure means "not yet"; keep the last for the report
                last_error = exc
                time.sleep(0.05)
            else:
                return
        raise RealDnsError(
            f"{self.command} did not answer within {timeout} s "
            f"(last probe error: {last_error!r}); log:\n{self.log_text()}"
        )

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL) and return its exit code (also ``returncode``).

        Resource handling: SIGCONT goes first, since a test may have left it SIGSTOPped and a
        stopped process does not act on SIGTERM. The Popen is always waited for.
        """
        process, self._process = self._process, None
        code: int | None = None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
                try:
                    code = process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait()
            else:
                code = process.returncode
            self.returncode = code
        return code

    def cleanup(self) -> None:
        """Stop, and remove the temporary directory if this object made it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


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


# --- dnsperf -----------------------------------------------------------------------------------

DnsperfMode = Literal["udp", "tcp", "dot"]


@dataclass(frozen=True, slots=True)
class DnsperfResult:
    """dnsperf's summary. Latencies are in seconds.

    ``p50``/``p99`` exist only for runs with ``percentiles=True``: dnsperf 2.10 prints no
    percentiles, so those runs add ``-v`` (one line per answer with its latency) and the
    percentiles are computed here (nearest rank) from those lines. Keep such runs at a low
    rate: writing a line per answer costs dnsperf time.
    """

    command: str
    mode: str
    clients: int
    queries_sent: int
    queries_completed: int
    queries_lost: int
    queries_interrupted: int
    rcodes: Mapping[str, int]
    run_time: float
    qps: float
    latency_avg: float
    latency_min: float
    latency_max: float
    latency_stddev: float
    p50: float | None = None
    p99: float | None = None
    latencies: tuple[float, ...] = field(default=(), repr=False)
    output: str = field(default="", repr=False)


def run_dnsperf(
    server_port: int,
    queries_file: Path | str,
    *,
    mode: DnsperfMode = "udp",
    clients: int = 20,
    seconds: float = 10,
    max_qps: int | None = None,
    timeout: float = 5,
    extra: Sequence[str] = (),
    server: str = LOOPBACK,
    percentiles: bool = False,
) -> DnsperfResult:
    """Run dnsperf once against ``server:server_port`` and parse its summary.

    ``mode="dot"`` does not verify the certificate (dnsperf cannot); fine for the limit row.
    Error handling: a non-zero exit or a summary that does not parse raises ``RealDnsError``
    with dnsperf's output.
    """
    argv = [
        _require_tool("dnsperf"),
        *("-s", server, "-p", str(server_port), "-d", str(queries_file), "-m", mode),
        *("-c", str(clients), "-l", _num(seconds), "-t", _num(timeout)),
    ]
    if max_qps is not None:
        argv += ["-Q", str(max_qps)]
    if percentiles:
        argv.append("-v")
    argv += extra
    completed = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=seconds + timeout + 30
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RealDnsError(f"{shlex.join(argv)} exited {completed.returncode}:\n{output}")
    return parse_dnsperf(completed.stdout, command=shlex.join(argv), mode=mode, clients=clients)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_FIELD = re.compile(r"^\s*([A-Za-z ()]+?):\s+(.*)$")
_PER_QUERY = re.compile(r"^> (\S+) .* (\d+\.\d+)$")


def parse_dnsperf(stdout: str, *, command: str, mode: str, clients: int) -> DnsperfResult:
    """Parse dnsperf 2.x output (the part before "Connection Statistics")."""
    summary, _, _ = stdout.partition("Connection Statistics")
    fields: dict[str, str] = {}
    for line in summary.splitlines():
        match = _FIELD.match(line)
        if match and match.group(1) not in fields:
            fields[match.group(1)] = match.group(2)
    try:
        latency = re.findall(r"[\d.]+", fields["Average Latency (s)"])
        result = DnsperfResult(
            command=command,
            mode=mode,
            clients=clients,
            queries_sent=_first_int(fields["Queries sent"]),
            queries_completed=_first_int(fields["Queries completed"]),
            queries_lost=_first_int(fields["Queries lost"]),
            queries_interrupted=_first_int(fields.get("Queries interrupted", "0")),
            rcodes=MappingProxyType(_parse_rcodes(fields.get("Response codes", ""))),
            run_time=float(fields["Run time (s)"]),
            qps=float(fields["Queries per second"]),
            latency_avg=float(latency[0]),
            latency_min=float(latency[1]),
            latency_max=float(latency[2]),
            latency_stddev=float(fields["Latency StdDev (s)"]),
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise RealDnsError(f"cannot parse dnsperf output of {command}:\n{stdout}") from exc
    latencies = tuple(
        sorted(float(m.group(2)) for m in map(_PER_QUERY.match, stdout.splitlines()) if m)
    )
    if not latencies:
        return result
    return replace(
        result,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        latencies=latencies,
        output=stdout,
    )


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil(n * pct / 100), at least 1
    return sorted_values[int(rank) - 1]


def _first_int(text: str) -> int:
    return int(text.split(maxsplit=1)[0])


def _parse_rcodes(text: str) -> dict[str, int]:
    return {name: int(count) for name, count in re.findall(r"([A-Z]+) (\d+) \(", text)}


# --- /proc sampling ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU time (user + system, all threads, seconds) and memory of a process at one moment."""

    cpu_seconds: float
    rss_bytes: int
    peak_rss_bytes: int


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``dot-proxy --workers`` forks its workers)."""
    tree = [pid]
    for member in tree:
        for children in Path(f"/proc/{member}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                tree.extend(int(child) for child in children.read_text().split())
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread) and its live children."""
    return sum(_own_cpu_seconds(member) for member in process_tree(pid))


def _own_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RealDnsError(f"no {key} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    """Resident set size now (``VmRSS``), summed over the process and its live children."""
    return sum(_status_kib(member, "VmRSS") for member in process_tree(pid)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """Highest resident set size since start (``VmHWM``), summed over the process tree."""
    return sum(_status_kib(member, "VmHWM") for member in process_tree(pid)) * 1024


def sample_process(pid: int) -> ProcSample:
    return ProcSample(cpu_seconds(pid), rss_bytes(pid), peak_rss_bytes(pid))


def cpu_us_per_query(before: ProcSample, after: ProcSample, answered: int) -> float:
    """CPU microseconds the process spent per answered query between two samples."""
    if answered <= 0:
        return float("nan")
    return (after.cpu_seconds - before.cpu_seconds) / answered * 1e6
