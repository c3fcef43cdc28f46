"""Configuration: frozen values built once at the edge and passed down.

``cli`` turns flags, ``DOT_PROXY_*`` variables and defaults into one :class:`Config`; this module
holds the types, the defaults and the parsing of values that have a syntax of their own (an
upstream spec, a client network). Every check raises :class:`ConfigError` with a message that
names the setting as the user gave it: the flag (``--timeout``), the environment variable
(``DOT_PROXY_TIMEOUT``) or, for a source such as a config file, whatever name that source
records in ``Config.origins`` (``FILE: timeout``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from dot_proxy.core.access import DEFAULT_ALLOW
from dot_proxy.core.cache import DEFAULT_CACHE_SIZE
from dot_proxy.core.hosts import HostsProblem, HostsTable, parse_hosts
from dot_proxy.core.pins import PinError, parse_pin
from dot_proxy.core.zones import name_from_wire, name_to_wire
from dot_proxy.errors import ConfigError

__all__ = [
    "DEFAULT_UPSTREAMS",
    "Config",
    "ForwardZone",
    "PlainSpec",
    "UpstreamSpec",
    "cleartext_zones",
    "flag",
    "parse_allow",
    "parse_forward",
    "parse_listen_address",
    "parse_metrics_address",
    "parse_upstream",
    "read_hosts",
]

DOT_PORT = 853
DNS_PORT = 53
PLAIN_PREFIX = "plain:"
UPSTREAM_POLICIES = ("failover", "round-robin", "fastest")
LOG_FORMATS = ("text", "json")
DEFAULT_UPSTREAMS = ("1.1.1.1:853#cloudflare-dns.com", "1.0.0.1:853#cloudflare-dns.com")
# RFC 1123 §2.1 host names; a trailing dot is allowed and dropped.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One DoT resolver: the address to dial and how to authenticate it.

    ``auth_name`` is what the certificate is checked against (RFC 8310 §8.1); it is the
    address itself when the spec gives no ``#NAME``. ``pins`` are SPKI pins (RFC 7858 §4.2):
    with pins, the server's key must match one of them; with pins and no name
    (``check_name`` false), the pins alone authenticate it and the certificate chain and name
    are not checked.
    """

    host: str
    port: int
    auth_name: str
    pins: tuple[str, ...] = ()
    check_name: bool = True

    @property
    def label(self) -> str:
        """How logs and errors name this upstream: ``HOST:PORT#NAME``, or ``HOST:PORT`` when
        no name is checked (pins alone authenticate it)."""
        address = host_port(self.host, self.port)
        return f"{address}#{self.auth_name}" if self.check_name else address

    @property
    def description(self) -> str:
        """The label and how the server is authenticated, for the startup log and ``check``."""
        if not self.pins:
            return self.label
        if self.check_name:
            return f"{self.label} ^{len(self.pins)} pin(s)"
        return f"{self.label} ^{len(self.pins)} pin(s), no name checked"


@dataclass(frozen=True, slots=True)
class PlainSpec:
    """A cleartext resolver on the local network (a router, a VPN's resolver): UDP, with TCP
    when an answer is truncated. The only way a query leaves in cleartext."""

    host: str
    port: int = DNS_PORT

    @property
    def label(self) -> str:
        """How logs and errors name this upstream."""
        return PLAIN_PREFIX + host_port(self.host, self.port)

    @property
    def description(self) -> str:
        """As :attr:`UpstreamSpec.description`: the label (there is nothing to authenticate)."""
        return self.label


def host_port(host: str, port: int) -> str:
    """``host:port`` as logs and messages write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ForwardZone:
    """``--forward ZONE=SPEC``: ZONE and every name under it go to ``targets``, in order.

    ``zone`` is the zone's lower-cased wire name (:func:`dot_proxy.core.zones.name_to_wire`).
    """

    zone: bytes
    targets: tuple[UpstreamSpec | PlainSpec, ...]

    @property
    def name(self) -> str:
        """The zone in presentation form, with its final dot."""
        return name_from_wire(self.zone)

    @property
    def cleartext(self) -> bool:
        """Whether this zone's queries leave unencrypted (its upstreams are all ``plain:``)."""
        return any(isinstance(target, PlainSpec) for target in self.targets)


def flag(option: str) -> str:
    """The command-line flag of a setting: ``"hedge-after"`` → ``"--hedge-after"``."""
    return "--" + option


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server needs, validated. Build with ``cli.build_config`` or directly."""

    upstreams: tuple[UpstreamSpec, ...]
    listen: tuple[str, ...] = ("0.0.0.0", "::")
    port: int = 53
    ca_file: str | None = None
    # The PEM text of ca_file, read at start while the process may still read it (before
    # --user drops privileges: a CA file only root may read is usual). None: read ca_file.
    ca_data: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    log_level: str = "INFO"
    tcp_idle_timeout: float = 10.0
    # Pool of upstream connections (RFC 7858 §3.4: reuse and pipeline).
    max_connections: int = 4
    max_pipeline: int = 128
    upstream_idle_timeout: float = 10.0
    max_in_flight: int = 2000
    # Several upstreams: "failover", "round-robin" or "fastest"; hedge after a fixed number
    # of seconds, after the upstream's own p95 latency (None), or never (0).
    upstream_policy: str = "failover"
    # RFC 8467 §4.1: pad queries to a multiple of 128 bytes on the encrypted hop.
    padding: bool = True
    # Who may query (RFC 5358: never an open resolver by default) and how much.
    allow: tuple[str, ...] = DEFAULT_ALLOW
    max_tcp_clients: int = 256
    ratelimit: float = 0.0  # queries/s per /24 or /56; 0 = off
    user: str | None = None
    hedge_after: float | None = None
    # Processes serving the same port (SO_REUSEPORT), each the whole proxy with its own pool.
    workers: int = 1
    # The answer cache: how many answers (0 = off), TTL bounds, and how long an expired
    # answer is kept to stand in when the upstreams fail (RFC 8767; 0 = never).
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_min_ttl: int = 0
    cache_max_ttl: int = 86400
    serve_stale: float = 86400.0
    # The operations endpoint (/metrics, /healthz, /readyz): (address, port), or None (off).
    metrics: tuple[str, int] | None = None
    log_format: str = "text"
    # The TOML file the settings were read from (--config), re-read on SIGHUP.
    config_file: str | None = None
    # Split DNS: zones sent elsewhere than the default upstreams, a hosts file answered here,
    # the built-in local zones (RFC 6761, RFC 6303, RFC 8375), and whether a client's EDNS
    # Client Subnet option goes upstream (RFC 7871 §11.1: off by default).
    forward: tuple[ForwardZone, ...] = ()
    hosts_file: str | None = None
    # The hosts file as read at start, while the process may still read it (before --user,
    # as the CA file), and the problems found in it, for the start-up log. None: the server
    # reads hosts_file itself. Re-read while serving when the file changes.
    hosts_table: HostsTable | None = field(default=None, compare=False, repr=False)
    hosts_problems: tuple[HostsProblem, ...] = field(default=(), compare=False, repr=False)
    local_zones: bool = True
    keep_ecs: bool = False
    # Where each setting that was given came from, as errors must name it: option ("timeout")
    # → "--timeout", "DOT_PROXY_TIMEOUT" or "FILE: timeout". Not part of the value.
    origins: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def name_of(self, option: str) -> str:
        """How an error names ``option`` (``"port"``): where its value came from, else its flag."""
        return self.origins.get(option, flag(option))

    def __post_init__(self) -> None:
        name = self.name_of
        if not self.upstreams:
            raise ConfigError(f"{name('upstream')}: at least one upstream is needed")
        if not self.listen:
            raise ConfigError(f"{name('listen')}: at least one address is needed")
        _check_range(name("port"), self.port, 0, 65535)
        _check_positive(name("timeout"), self.timeout)
        _check_positive(name("tcp-idle-timeout"), self.tcp_idle_timeout)
        _check_positive(name("upstream-idle-timeout"), self.upstream_idle_timeout)
        _check_range(name("max-connections"), self.max_connections, 1, 1024)
        # RFC 7766 §6.2.1: IDs must be unique among a connection's in-flight queries.
        _check_range(name("max-pipeline"), self.max_pipeline, 1, 65535)
        _check_range(name("max-in-flight"), self.max_in_flight, 1, 1_000_000)
        _check_range(name("max-tcp-clients"), self.max_tcp_clients, 1, 1_000_000)
        _check_range(name("workers"), self.workers, 1, 256)
        _check_range(name("cache-size"), self.cache_size, 0, 10_000_000)
        # RFC 8767 §4 caps TTLs at 7 days; nothing is kept longer.
        _check_range(name("cache-max-ttl"), self.cache_max_ttl, 1, 604_800)
        _check_range(name("cache-min-ttl"), self.cache_min_ttl, 0, self.cache_max_ttl)
        if not 0 <= self.serve_stale <= 604_800:
            raise ConfigError(
                f"{name('serve-stale')}: {self.serve_stale:g} must be 0 (off) to 604800 seconds"
                " (7 days)"
            )
        if not 0 <= self.ratelimit < float("inf"):
            raise ConfigError(
                f"{name('ratelimit')}: {self.ratelimit:g} must be 0 (off) or a rate per second"
            )
        for network in self.allow:
            parse_allow(network, where=name("allow"))
        if self.upstream_policy not in UPSTREAM_POLICIES:
            raise ConfigError(
                f"{name('upstream-policy')}: {self.upstream_policy!r} is not one of "
                + ", ".join(UPSTREAM_POLICIES)
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"{name('log-format')}: {self.log_format!r} is not one of " + ", ".join(LOG_FORMATS)
            )
        self._check_hedge_after()
        self._check_forward()

    def _check_hedge_after(self) -> None:
        hedge_after = self.hedge_after
        if hedge_after is None:
            return
        where = self.name_of("hedge-after")
        if not hedge_after >= 0:  # also NaN
            raise ConfigError(
                f"{where}: {hedge_after:g} must not be negative (0 or off turns hedging off)"
            )
        if hedge_after >= self.timeout:
            raise ConfigError(
                f"{where}: {hedge_after:g} must be less than the query timeout "
                f"({self.timeout:g} s, {self.name_of('timeout')}), or 0 (off)"
            )

    def _check_forward(self) -> None:
        seen: set[bytes] = set()
        for forward in self.forward:
            if forward.zone in seen:
                raise ConfigError(f"{self.name_of('forward')}: zone {forward.name} is given twice")
            if not forward.targets:
                raise ConfigError(f"{self.name_of('forward')}: zone {forward.name} has no upstream")
            seen.add(forward.zone)

    @property
    def connect_timeout(self) -> float:
        """Budget for TCP connect plus TLS handshake, leaving time to fail over."""
        return self.timeout * 0.4

    @property
    def stall_timeout(self) -> float:
        """Silence, with queries outstanding, after which a connection that has answered
        before is taken for stale (one that never answered waits for the deadline)."""
        return min(1.0, self.timeout / 4)


def _check_range(where: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value} is out of range ({low} to {high})")


def _check_positive(where: str, value: float) -> None:
    if not 0 < value < float("inf"):  # also rejects NaN
        raise ConfigError(f"{where}: {value:g} must be a positive number of seconds")


def parse_listen_address(text: str, *, where: str = "--listen") -> str:
    """Validate one ``--listen`` value: an IPv4 or IPv6 address (brackets allowed).

    ``where`` names the setting in the error (``--listen``, ``DOT_PROXY_LISTEN``, ...).
    """
    address = text.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an IP address") from None


def parse_metrics_address(text: str, *, where: str = "--metrics") -> tuple[str, int]:
    """Parse ``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6) for the operations endpoint.

    The address is an IP address, as for ``--listen``; port 0 lets the kernel choose.
    """
    address, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: {text!r} is not ADDR:PORT (e.g. 127.0.0.1:9153, [::1]:9153)")
    if ":" in address and not (address.startswith("[") and address.endswith("]")):
        raise ConfigError(f"{where}: write IPv6 as [ADDRESS]:PORT")
    return parse_listen_address(address, where=where), int(port)


def parse_allow(text: str, *, where: str = "--allow") -> str:
    """Validate one ``--allow`` value and return its normal form (``10.0.0.0/8``).

    An address alone is that address (``/32``, ``/128``). A network with host bits set
    (``10.0.0.1/8``) is refused rather than widened, as ``ip_network(strict=True)`` does: in an
    access list the two readings, the network or the one host, differ by millions of addresses,
    and only the user knows which was meant.
    """
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an address or network") from None
    address = text.strip().partition("/")[0]
    raise ConfigError(
        f"{where}: {text!r} has host bits set: write the network {loose}, "
        f"or {address}/{loose.max_prefixlen} for the one address"
    )


def parse_upstream(text: str, *, where: str = "--upstream") -> UpstreamSpec:
    """Parse ``HOST[:PORT][#AUTH_NAME][^PIN]...``; IPv6 as ``[ADDR]:PORT`` or a bare ``ADDR``.

    HOST must be an IP address: resolving a name would need DNS before DNS works, and the
    name to authenticate is given separately after ``#`` (RFC 8310 §8.1). Each ``^PIN`` is a
    base64 SHA-256 SPKI pin (RFC 7858 §4.2); give two for a backup key.
    """
    spec, *pin_texts = text.strip().split("^")
    where = f"{where}: {text!r}"
    try:
        pins = tuple(dict.fromkeys(parse_pin(pin) for pin in pin_texts))
    except PinError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    address_part, hash_sign, auth_name = spec.partition("#")
    if hash_sign and not _HOSTNAME.match(auth_name):
        raise ConfigError(f"{where}: {auth_name!r} after '#' is not a host name")
    host, port = _split_host_port(address_part, where)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(
            f"{where}: {host!r} is not an IP address (give the address, then '#' and its name)"
        ) from None
    return UpstreamSpec(
        host=host,
        port=port,
        auth_name=auth_name.rstrip(".") or host,
        pins=pins,
        check_name=bool(hash_sign) or not pins,
    )


def parse_forward(text: str, *, where: str = "--forward") -> ForwardZone:
    """Parse one ``--forward ZONE=SPEC`` value.

    SPEC is a list separated by ``|`` of upstreams written as for ``--upstream`` (DoT,
    verified, pins allowed), or of ``plain:HOST[:PORT]`` (cleartext, port 53 by default; IPv6
    in brackets, ``plain:[fd00::1]:53``), not both. ZONE may end with a dot; ``.`` is the root.
    ``where`` names the setting in errors (``--forward``, ``DOT_PROXY_FORWARD``, ...).
    """
    zone_text, equals, spec = text.strip().partition("=")
    setting = where
    where = f"{setting}: {text!r}"
    if not equals or not zone_text.strip() or not spec.strip():
        raise ConfigError(f"{where}: write ZONE=UPSTREAM[|UPSTREAM...]")
    try:
        zone = name_to_wire(zone_text.strip())
    except ValueError as exc:
        raise ConfigError(f"{where}: {zone_text.strip()!r} is not a zone name ({exc})") from None
    targets: list[UpstreamSpec | PlainSpec] = []
    for item in (part.strip() for part in spec.split("|")):
        if not item:
            raise ConfigError(f"{where}: an empty upstream between '|'")
        if item.lower().startswith(PLAIN_PREFIX):
            target: UpstreamSpec | PlainSpec = _parse_plain(item[len(PLAIN_PREFIX) :], where)
        else:
            target = parse_upstream(item, where=setting)
        if target in targets:
            raise ConfigError(f"{where}: {target.label} is listed twice")
        targets.append(target)
    if len({isinstance(target, PlainSpec) for target in targets}) > 1:
        # A zone's queries are encrypted or they are not: a TLS upstream with a plain:
        # fallback would send them in cleartext whenever the TLS one is slow or down.
        raise ConfigError(f"{where}: mixes TLS and plain: upstreams; use one kind per zone")
    return ForwardZone(zone, tuple(targets))


def _parse_plain(text: str, where: str) -> PlainSpec:
    if "#" in text or "^" in text:
        raise ConfigError(f"{where}: a plain: upstream has no name or pin to check (no TLS)")
    host, port = _split_host_port(text, where, default_port=DNS_PORT)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"{where}: {host!r} is not an IP address") from None
    return PlainSpec(host, port)


def cleartext_zones(config: Config) -> list[str]:
    """The start-up log's warnings: one per zone whose queries may leave unencrypted."""
    return [
        f"queries for {forward.name} and the names under it leave in CLEARTEXT to "
        + ", ".join(target.label for target in forward.targets)
        + " (plain DNS: anyone on the path can read and alter them)"
        for forward in config.forward
        if forward.cleartext
    ]


def read_hosts(path: str, *, where: str = "--hosts") -> tuple[HostsTable, list[HostsProblem]]:
    """Read and parse a hosts file (``--hosts``); its problems are for the log, by line.

    Bytes that are not UTF-8 make only their own line a problem (a name that is not a host
    name), not the whole file. Error handling: raises :class:`ConfigError` naming ``where``
    (``--hosts``, ``DOT_PROXY_HOSTS``, ...) when the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {path!r} cannot be read ({exc.strerror or exc})") from None
    return parse_hosts(text)


def _split_host_port(text: str, where: str, *, default_port: int = DOT_PORT) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"{where}: write IPv6 as [ADDRESS]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""  # IPv4 without port, or a bare IPv6 address
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)
