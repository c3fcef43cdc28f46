"""Command line: flags, ``DOT_PROXY_*`` environment and defaults → one Config → serve.

Precedence is flag, then environment variable, then default. A value that cannot be used ends
the program with one line on stderr naming the setting as the user gave it (the flag, or the
variable when the value came from the environment), and exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import gc
import logging
import os
import pwd
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import NoReturn, Protocol, TypeVar

import trio

from dot_proxy import __version__
from dot_proxy.check import make_test_query, run_check
from dot_proxy.config import (
    DEFAULT_UPSTREAMS,
    Config,
    flag,
    parse_allow,
    parse_forward,
    parse_listen_address,
    parse_upstream,
    read_hosts,
)
from dot_proxy.cpus import usable_cores
from dot_proxy.errors import ConfigError
from dot_proxy.healthcheck import run_healthcheck
from dot_proxy.resolver import Resolver, open_resolver
from dot_proxy.serve.activation import adopt_sockets, take_listen_fds
from dot_proxy.serve.notify import Notifier
from dot_proxy.serve.server import serve
from dot_proxy.serve.sockets import bind_worker_sockets
from dot_proxy.upstream.tls import make_ssl_context
from dot_proxy.workers import run_workers, watch_parent

__all__ = ["build_config", "main"]

log = logging.getLogger("dot_proxy")

EXIT_USAGE = 2
ENV_PREFIX = "DOT_PROXY_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The cyclic collector's thresholds (set in main, with gc.freeze). A burst of queries in flight
# holds a few thousand tracked objects (tasks, coroutines, cancel scopes) that reference counting
# frees moments later; at CPython's 700 every burst set off a young pass over them all. At
# 10,000 the youngest generation holds what is alive anyway (docs/performance.md has the
# figures). The older generations' (2, 2) put a full pass about as many allocations apart as
# CPython's defaults do, so what the failure paths leave in cycles (one per closed TLS stream,
# inside trio) is collected as often as it would be without this.
#
# This relies on the query path making no reference cycles: a cycle per query would wait for
# a full pass, tens of thousands of allocations later, and memory would grow with the load. The
# easiest one to make: an exception kept to be raised later (a connection's, a race's) and then
# raised in many tasks, each raise adding a frame that holds it to its traceback. So every kept
# exception is stored and raised through errors.fresh (a copy without traceback), and
# tests/test_no_cycles.py checks that answering and failing queries leave no cycle of ours.
GC_THRESHOLDS = (10_000, 2, 2)
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the line says what is wrong and where.
        raise ConfigError(message)


UPSTREAM_SYNTAX = "HOST[:PORT][#AUTH_NAME][^PIN]"
UPSTREAM_HELP = (
    "DoT resolver, repeatable, tried in order: an IP address, the name its certificate must "
    "carry after #, SPKI pins after ^ (default: Cloudflare 1.1.1.1 and 1.0.0.1, "
    "#cloudflare-dns.com)"
)
CA_FILE_HELP = "trust these CA certificates instead of the system's"
TIMEOUT_HELP = "deadline for each query (default: 5)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dot-proxy",
        description="Forward plain DNS (UDP and TCP) to resolvers over TLS (RFC 7858). "
        "`dot-proxy check --help` tells how to test the upstreams.",
        epilog="Every flag also reads DOT_PROXY_<FLAG> (e.g. DOT_PROXY_UPSTREAM); repeatable "
        "flags take a comma-separated list there. Example: dot-proxy --listen 127.0.0.1 "
        "--port 5300",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"dot-proxy {__version__}")
    add(
        "--listen",
        action="append",
        metavar="ADDR",
        help="address to listen on, repeatable (default: 0.0.0.0 and ::)",
    )
    add("--port", metavar="N", help="port for UDP and TCP (default: 53)")
    add("--upstream", action="append", metavar=UPSTREAM_SYNTAX, help=UPSTREAM_HELP)
    add("--ca-file", metavar="PEM", help=CA_FILE_HELP)
    add("--timeout", metavar="SECONDS", help=TIMEOUT_HELP)
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    add(
        "--tcp-idle-timeout",
        metavar="SECONDS",
        help="close an idle client TCP connection after this long (default: 10)",
    )
    add("--max-connections", metavar="N", help="TLS connections per upstream at most (default: 4)")
    add(
        "--max-pipeline",
        metavar="N",
        help="queries in flight on one upstream connection at most (default: 128)",
    )
    add(
        "--upstream-idle-timeout",
        metavar="SECONDS",
        help="close an idle upstream connection after this long (default: 10)",
    )
    add(
        "--max-in-flight",
        metavar="N",
        help="queries being resolved at once, all clients (default: 2000)",
    )
    add(
        "--allow",
        action="append",
        metavar="CIDR",
        help="client network that may query, repeatable (default: loopback and private "
        "networks; 0.0.0.0/0 and ::/0 make an open resolver)",
    )
    add(
        "--max-tcp-clients",
        metavar="N",
        help="client TCP connections open at once; more wait in the backlog (default: 256)",
    )
    add(
        "--ratelimit",
        metavar="QPS",
        help="queries per second per client /24 or /56; over it UDP is dropped, TCP "
        "answered REFUSED (default: 0, off)",
    )
    add(
        "--user",
        metavar="NAME",
        help="when started as root: bind the sockets and read --ca-file, then run as this user",
    )
    add(
        "--no-padding",
        action="store_const",
        const="true",
        default=None,
        help="do not pad queries to the upstream (RFC 8467); padding hides their length",
    )
    add(
        "--upstream-policy",
        metavar="POLICY",
        help="with several upstreams: failover (in order; default), round-robin, or fastest",
    )
    add(
        "--workers",
        metavar="N|auto",
        help="processes serving the same port, each with its own upstream connections: "
        "throughput on a machine with cores to spare; auto: one per usable core, within the "
        "CPU set and the cgroup CPU quota (default: 1)",
    )
    add(
        "--cache-size",
        metavar="N",
        help="answers kept in the cache, least recently used dropped first; 0 turns the "
        "cache off (default: 10000)",
    )
    add(
        "--cache-min-ttl",
        metavar="SECONDS",
        help="keep and serve cached answers at least this long (default: 0)",
    )
    add(
        "--cache-max-ttl",
        metavar="SECONDS",
        help="keep and serve cached answers at most this long (default: 86400)",
    )
    add(
        "--serve-stale",
        metavar="SECONDS",
        help="keep expired answers this long, to answer with when the upstreams fail "
        "(RFC 8767; 0: off; default: 86400)",
    )
    add(
        "--hedge-after",
        metavar="SECONDS|auto|off",
        help="also ask the next upstream when the first has not answered after this long "
        "(default: auto, the upstream's own recent p95 latency, at least 0.1 s)",
    )
    add(
        "--forward",
        action="append",
        metavar="ZONE=SPEC",
        help="send ZONE and the names under it to SPEC instead: upstreams as for --upstream, "
        "or plain:HOST[:PORT] for a cleartext resolver on the local network, several "
        "separated by '|'; repeatable",
    )
    add(
        "--hosts",
        metavar="FILE",
        help="answer the names and addresses of this /etc/hosts-format file here",
    )
    add(
        "--no-local-zones",
        action="store_const",
        const="true",
        default=None,
        help="forward localhost., private reverse zones, home.arpa. etc. like any other name "
        "(by default they are answered here and never leave; RFC 6761, RFC 6303)",
    )
    add(
        "--keep-ecs",
        action="store_const",
        const="true",
        default=None,
        help="pass a client's EDNS Client Subnet option upstream, and back (by default it is "
        "removed: it tells every resolver on the way which network asked; RFC 7871)",
    )
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dot-proxy check",
        description="Connect to each upstream as the proxy would, authenticate it, send one "
        "test query, and print what was found: TLS version, certificate names, the SPKI pin "
        "of the key presented, and the answer. Exit status 0 if every upstream answered the "
        "test query with NOERROR or NXDOMAIN, 1 if any failed (REFUSED included: the "
        "upstream is reached but will not resolve for us), 2 for a bad flag.",
        epilog="--upstream, --ca-file and --timeout also read DOT_PROXY_UPSTREAM, "
        "DOT_PROXY_CA_FILE and DOT_PROXY_TIMEOUT, as the proxy does.",
    )
    add = parser.add_argument
    add("--upstream", action="append", metavar=UPSTREAM_SYNTAX, help=UPSTREAM_HELP)
    add("--ca-file", metavar="PEM", help=CA_FILE_HELP)
    add("--timeout", metavar="SECONDS", help=TIMEOUT_HELP)
    add(
        "--query",
        metavar="NAME",
        default=".",
        help="the test query: NAME's A record, or the root's NS records for '.' (default), "
        "e.g. a name in its zone for a resolver that serves only its own zones",
    )
    return parser


def build_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Turn arguments and environment into a validated :class:`Config`.

    Error handling: raises :class:`ConfigError` naming the flag, or the environment variable
    when the value came from one, for any unusable value.
    """
    return _config_from(_parser().parse_args(argv), environ)


def _config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    value = _Lookup([_Flags(args), _Environment(environ)], known=vars(args))
    ca_file = value.one("ca-file", str, None)
    ca_data = None if ca_file is None else _read_ca_file(ca_file, value.where("ca-file"))
    hosts_file = value.one("hosts", str, None)
    # Read now, as the CA file is (before --user): unreadable exits 2 here; its bad lines
    # are logged when serving starts.
    hosts_table, hosts_problems = (
        (None, []) if hosts_file is None else read_hosts(hosts_file, where=value.where("hosts"))
    )
    log_level = value.one("log-level", str.upper, "INFO")
    if log_level not in LOG_LEVELS:
        raise ConfigError(
            f"{value.where('log-level')}: {log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    defaults = Config(upstreams=(parse_upstream(DEFAULT_UPSTREAMS[0]),))
    upstreams = value.many("upstream", list(DEFAULT_UPSTREAMS))
    listen = value.many("listen", list(defaults.listen))
    allow = value.many("allow", list(defaults.allow))
    forwards = value.many("forward", [])
    return Config(
        upstreams=tuple(parse_upstream(text, where=value.where("upstream")) for text in upstreams),
        listen=tuple(parse_listen_address(text, where=value.where("listen")) for text in listen),
        port=value.one("port", int, defaults.port),
        ca_file=ca_file,
        ca_data=ca_data,
        timeout=value.one("timeout", float, defaults.timeout),
        log_level=log_level,
        tcp_idle_timeout=value.one("tcp-idle-timeout", float, defaults.tcp_idle_timeout),
        padding=not value.one("no-padding", _boolean, False),
        allow=tuple(parse_allow(text, where=value.where("allow")) for text in allow),
        max_tcp_clients=value.one("max-tcp-clients", int, defaults.max_tcp_clients),
        ratelimit=value.one("ratelimit", float, defaults.ratelimit),
        user=value.one("user", str, defaults.user),
        max_connections=value.one("max-connections", int, defaults.max_connections),
        max_pipeline=value.one("max-pipeline", int, defaults.max_pipeline),
        upstream_idle_timeout=value.one(
            "upstream-idle-timeout", float, defaults.upstream_idle_timeout
        ),
        max_in_flight=value.one("max-in-flight", int, defaults.max_in_flight),
        upstream_policy=value.one("upstream-policy", str.lower, defaults.upstream_policy),
        hedge_after=value.one("hedge-after", _hedge_after, defaults.hedge_after),
        workers=value.one("workers", _workers, defaults.workers),
        cache_size=value.one("cache-size", int, defaults.cache_size),
        cache_min_ttl=value.one("cache-min-ttl", int, defaults.cache_min_ttl),
        cache_max_ttl=value.one("cache-max-ttl", int, defaults.cache_max_ttl),
        serve_stale=value.one("serve-stale", float, defaults.serve_stale),
        forward=tuple(parse_forward(text, where=value.where("forward")) for text in forwards),
        hosts_file=hosts_file,
        hosts_table=hosts_table,
        hosts_problems=tuple(hosts_problems),
        local_zones=not value.one("no-local-zones", _boolean, False),
        keep_ecs=value.one("keep-ecs", _boolean, False),
        origins=MappingProxyType(value.origins),
    )


class _Source(Protocol):
    """Where settings come from: flags, the environment (and, next, a config file)."""

    def get(self, option: str) -> tuple[str, object] | None:
        """``(name, raw value)`` for ``option`` ("hedge-after") if this source sets it.

        ``name`` is how errors name the setting ("--hedge-after", "DOT_PROXY_HEDGE_AFTER",
        "FILE: hedge-after"); the raw value is text, a list of texts for a repeatable flag,
        or a typed value (a config file's number or boolean).
        """


class _Flags:
    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args

    def get(self, option: str) -> tuple[str, object] | None:
        given = getattr(self._args, option.replace("-", "_"), None)
        return None if given is None else (flag(option), given)


class _Environment:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, option: str) -> tuple[str, object] | None:
        variable = ENV_PREFIX + option.replace("-", "_").upper()
        text = self._environ.get(variable, "").strip()
        return (variable, text) if text else None  # blank counts as unset


class _Lookup:
    """Each setting from the first source that has it, else its default; converted, with
    errors naming the setting as that source does. Remembers where each value came from."""

    def __init__(self, sources: Sequence[_Source], *, known: Mapping[str, object]) -> None:
        self._sources = sources
        self._known = known  # the command's own options: `check` reads only its few
        self.origins: dict[str, str] = {}

    def where(self, option: str) -> str:
        """How errors name ``option``: the source its value came from, else its flag."""
        return self.origins.get(option, flag(option))

    def _raw(self, option: str) -> object | None:
        if option.replace("-", "_") not in self._known:
            return None
        for source in self._sources:
            found = source.get(option)
            if found is not None:
                self.origins[option], raw = found
                return raw
        return None

    def one(self, option: str, convert: Callable[[str], T], default: T) -> T:
        raw = self._raw(option)
        if raw is None:
            return default
        text = raw if isinstance(raw, str) else str(raw)
        try:
            return convert(text)
        except ValueError:
            raise ConfigError(f"{self.where(option)}: {text!r} is not a valid value") from None

    def many(self, option: str, default: list[str]) -> list[str]:
        raw = self._raw(option)
        if raw is None:
            return default
        if isinstance(raw, str):
            return [item for item in (part.strip() for part in raw.split(",")) if item]
        assert isinstance(raw, list)
        return [str(item) for item in raw]


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        # The cores this process may use: its CPU set, within a container's CPU quota.
        return usable_cores()
    return int(text)


def _hedge_after(text: str) -> float | None:
    lowered = text.strip().lower()
    if lowered == "auto":
        return None
    if lowered == "off":
        return 0.0
    return float(lowered)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _read_ca_file(path: str, where: str) -> str:
    """The CA file's text, read now: before --user drops privileges, as servers read keys."""
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path!r} is not PEM text") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        make_ssl_context(ca_file=path, ca_data=text)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}: {path!r} holds no usable CA certificate ({exc})") from None
    return text


def _configure_logging(level: str, *, workers: int = 1) -> None:
    # With several workers, each line says which process wrote it.
    process = " [%(process)d]" if workers > 1 else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _drop_privileges(user: str, where: str = "--user") -> None:
    """Become ``user`` (and its group, no others) once the sockets are bound.

    Error handling: raises :class:`ConfigError` for an unknown user, or when not root and
    not already that user.
    """
    try:
        record = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"{where}: no such user {user!r}") from None
    if os.geteuid() == record.pw_uid:
        return
    if os.geteuid() != 0:
        raise ConfigError(
            f"{where}: only root can become {user!r}; start as root or drop the setting"
        )
    # Codecs load on first use, from the Python installation, which the new user may not be
    # allowed to read (a Python under /root): the socket module encodes every host name it
    # dials with "idna", so load that codec now, while still root.
    codecs.lookup("idna")
    os.setgroups([])
    os.setgid(record.pw_gid)
    os.setuid(record.pw_uid)
    log.info("running as user %s (uid %d, gid %d)", user, record.pw_uid, record.pw_gid)


def _check(argv: list[str]) -> NoReturn:
    try:
        args = _check_parser().parse_args(argv)
        config = _config_from(args, os.environ)
        query = make_test_query(args.query)
    except ConfigError as exc:
        print(f"dot-proxy check: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(trio.run(partial(run_check, config, query=query)))


def _healthcheck(argv: list[str]) -> NoReturn:
    # The server's own flags and variables: it asks the proxy they describe.
    try:
        config = build_config(argv, os.environ)
    except ConfigError as exc:
        print(f"dot-proxy healthcheck: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(trio.run(run_healthcheck, config))


# `dot-proxy NAME [flags]`: a different job, an exit status.
SUBCOMMANDS: dict[str, Callable[[list[str]], NoReturn]] = {
    "check": _check,
    "healthcheck": _healthcheck,
}


async def _run(config: Config, sockets: list[socket.socket], parent: int | None = None) -> None:
    # The service manager hears from the process it started, not from workers (parent set).
    notifier = Notifier.from_environ(os.environ) if parent is None else None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        if parent is not None:
            nursery.start_soon(watch_parent, parent, stop)
        bound = await nursery.start(_serve, config, sockets, stop, nursery.cancel_scope)
        if notifier is not None and notifier.enabled:
            # Type=notify: systemd counts the service started only now, once it answers.
            where = (f"{kind} [{a}]:{p}" if ":" in a else f"{kind} {a}:{p}" for kind, a, p in bound)
            notifier.ready("serving on " + ", ".join(where))
            await stop.wait()
            notifier.stopping()


async def _serve(
    config: Config,
    sockets: list[socket.socket],
    stop: trio.Event,
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_resolver(config) as resolver, trio.open_nursery() as reloads:
        reloads.start_soon(_reload_on_signal, config, resolver)
        await serve(config, sockets=sockets, stop=stop, resolver=resolver, task_status=task_status)
        reloads.cancel_scope.cancel()
    done.cancel()  # served and stopped: the signal receivers and parent watch end too


async def _reload_on_signal(config: Config, resolver: Resolver) -> None:
    # SIGHUP re-reads what may change while serving (as unbound's and dnsmasq's do); it never
    # stops the proxy. Today that is the hosts file, which is also re-read when it changes.
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            if config.hosts_file is None:
                log.info("received SIGHUP: nothing to re-read")
                continue
            log.info("received SIGHUP: re-reading the hosts file")
            await resolver.routes.reload_hosts()


async def _stop_on_signal(stop: trio.Event) -> None:
    # Signals keep being taken until serving ends: a worker gets Ctrl-C from the terminal and
    # SIGTERM from its supervisor, and the second must not kill it mid-way through stopping.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()


def _serve_worker(config: Config) -> Callable[[list[socket.socket], int], None]:
    def serve_one(sockets: list[socket.socket], parent: int) -> None:
        trio.run(_run, config, sockets, parent)

    return serve_one


def _listening_sockets(config: Config) -> list[list[socket.socket]]:
    """The sockets systemd passed (socket activation), else ours, bound per worker."""
    passed = take_listen_fds(os.environ, os.getpid())
    if passed is None:
        return bind_worker_sockets(config)
    if config.workers != 1:
        raise ConfigError(
            "--workers: the sockets systemd passes (LISTEN_FDS) serve one process; "
            "use --workers 1, or run without the socket unit"
        )
    return [adopt_sockets(passed)]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the proxy until SIGINT or SIGTERM; exit 2 with one line for a bad setting.

    ``dot-proxy check [flags]`` instead checks each upstream once and exits 0 if all work.
    ``dot-proxy healthcheck [flags]`` asks the proxy those flags describe whether it serves.
    Started by a systemd socket unit, it serves the sockets passed (``LISTEN_FDS``) and
    tells systemd when it is ready (``NOTIFY_SOCKET``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]](args[1:])
    try:
        config = build_config(args, os.environ)
        _configure_logging(config.log_level, workers=config.workers)
        socket_sets = _listening_sockets(config)
        if config.user is not None:
            _drop_privileges(config.user, config.name_of("user"))
    except ConfigError as exc:
        print(f"dot-proxy: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    # What exists now (modules, config, sockets) lives as long as the process: keep it out of
    # the cyclic collector's full passes, so that a full pass scans only what serving made and
    # stays short (a long one stops the serve loops while datagrams pile up in the kernel).
    # Before forking, it also keeps the workers' pages shared.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if len(socket_sets) == 1:
        trio.run(_run, config, socket_sets[0])
        log.info("stopped")
        return
    # The sockets are bound and listening: what arrives before the workers run waits in
    # the kernel's queues. The workers themselves do not notify (NotifyAccess=main).
    Notifier.from_environ(os.environ).ready(f"{config.workers} workers serving")
    status = run_workers(socket_sets, _serve_worker(config))
    log.info("stopped")
    sys.exit(status)
