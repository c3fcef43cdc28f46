"""Command line: flags, ``DOT_PROXY_*`` environment and defaults → one Config → serve.

Precedence is flag, then environment variable, then default. A value that cannot be used ends
the program with one line on stderr naming the flag, and exit status 2.
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
from typing import NoReturn, TypeVar

import trio

from dot_proxy import __version__
from dot_proxy.check import run_check
from dot_proxy.config import (
    DEFAULT_UPSTREAMS,
    Config,
    parse_forward,
    parse_listen_address,
    parse_upstream,
    read_hosts,
)
from dot_proxy.errors import ConfigError
from dot_proxy.serve.server import serve
from dot_proxy.serve.sockets import bind_worker_sockets
from dot_proxy.upstream.tls import make_ssl_context
from dot_proxy.workers import run_workers, watch_parent

__all__ = ["build_config", "main"]

log = logging.getLogger("dot_proxy")

EXIT_USAGE = 2
ENV_PREFIX = "DOT_PROXY_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The cyclic collector's thresholds: a pass over the youngest generation once 10,000 tracked
# objects (net) were allocated, instead of CPython's 700. A burst of queries in flight holds a
# few thousand (tasks, coroutines, cancel scopes), so at 700 every burst set off a pass over
# them all, though reference counting freed nearly all of them moments later: under dnsperf's
# maximum load ~3,000 passes in 10 s, 5% of the process's time (bench/gc_passes.py). The query
# path makes no reference cycles (tests/test_no_cycles.py), so the bigger generation holds what
# lives anyway. The older generations' thresholds (2, 2) keep a full pass about as many
# allocations apart as CPython's defaults do (90,000 against 85,000): what the failure paths
# leave in cycles (a closed TLS stream is one, inside trio) is still collected as often.
GC_THRESHOLDS = (10_000, 2, 2)
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the line says what is wrong and where.
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dot-proxy",
        description="Forward plain DNS (UDP and TCP) to resolvers over TLS (RFC 7858). "
        "`dot-proxy check [--upstream ...]` tests the upstreams and exits.",
        epilog="Every flag also reads DOT_PROXY_<FLAG> (e.g. DOT_PROXY_UPSTREAM); repeatable "
        "flags take a comma-separated list there.",
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
    add(
        "--upstream",
        action="append",
        metavar="HOST[:PORT][#AUTH_NAME]",
        help="DoT resolver, repeatable, tried in order (default: Cloudflare "
        "1.1.1.1 and 1.0.0.1, #cloudflare-dns.com)",
    )
    add("--ca-file", metavar="PEM", help="trust these CA certificates instead of the system's")
    add("--timeout", metavar="SECONDS", help="deadline for each query (default: 5)")
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
        "--no-reuse",
        action="store_const",
        const="true",
        default=None,
        help="open a new TLS connection for every query (slow; for comparison only)",
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
        help="when started as root: bind the sockets, then run as this user",
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
        "throughput on a machine with cores to spare; auto: one per usable core (default: 1)",
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


def build_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Turn arguments and environment into a validated :class:`Config`.

    Error handling: raises :class:`ConfigError` naming the flag for any unusable value.
    """
    args = _parser().parse_args(argv)
    value = _Lookup(args, environ)
    ca_file = value.one("ca_file", str, None)
    if ca_file is not None:
        _check_ca_file(ca_file)
    hosts_file = value.one("hosts", str, None)
    if hosts_file is not None:
        read_hosts(hosts_file)  # unreadable: exit 2 now; bad lines are logged when serving
    log_level = value.one("log_level", str.upper, "INFO")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    defaults = Config(upstreams=(parse_upstream(DEFAULT_UPSTREAMS[0]),))
    return Config(
        upstreams=tuple(
            parse_upstream(text) for text in value.many("upstream", list(DEFAULT_UPSTREAMS))
        ),
        listen=tuple(
            parse_listen_address(text) for text in value.many("listen", list(defaults.listen))
        ),
        port=value.one("port", int, defaults.port),
        ca_file=ca_file,
        timeout=value.one("timeout", float, defaults.timeout),
        log_level=log_level,
        tcp_idle_timeout=value.one("tcp_idle_timeout", float, defaults.tcp_idle_timeout),
        reuse=not value.one("no_reuse", _boolean, False),
        padding=not value.one("no_padding", _boolean, False),
        allow=tuple(value.many("allow", list(defaults.allow))),
        max_tcp_clients=value.one("max_tcp_clients", int, defaults.max_tcp_clients),
        ratelimit=value.one("ratelimit", float, defaults.ratelimit),
        user=value.one("user", str, defaults.user),
        max_connections=value.one("max_connections", int, defaults.max_connections),
        max_pipeline=value.one("max_pipeline", int, defaults.max_pipeline),
        upstream_idle_timeout=value.one(
            "upstream_idle_timeout", float, defaults.upstream_idle_timeout
        ),
        max_in_flight=value.one("max_in_flight", int, defaults.max_in_flight),
        upstream_policy=value.one("upstream_policy", str.lower, defaults.upstream_policy),
        hedge_after=value.one("hedge_after", _hedge_after, defaults.hedge_after),
        workers=value.one("workers", _workers, defaults.workers),
        forward=tuple(parse_forward(text) for text in value.many("forward", [])),
        hosts_file=hosts_file,
        local_zones=not value.one("no_local_zones", _boolean, False),
        keep_ecs=value.one("keep_ecs", _boolean, False),
    )


class _Lookup:
    """Flag, else environment variable, else default; converted, with errors naming the flag."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        self._args = args
        self._environ = environ

    def _raw(self, name: str) -> tuple[str, object]:
        flag = "--" + name.replace("_", "-")
        given = getattr(self._args, name)
        if given is not None:
            return flag, given
        variable = ENV_PREFIX + name.upper()
        text = self._environ.get(variable, "").strip()
        return (variable, text) if text else (flag, None)

    def one(self, name: str, convert: Callable[[str], T], default: T) -> T:
        where, raw = self._raw(name)
        if raw is None:
            return default
        assert isinstance(raw, str)
        try:
            return convert(raw)
        except ValueError:
            raise ConfigError(f"{where}: {raw!r} is not a valid value") from None

    def many(self, name: str, default: list[str]) -> list[str]:
        _where, raw = self._raw(name)
        if raw is None:
            return default
        if isinstance(raw, str):
            return [item for item in (part.strip() for part in raw.split(",")) if item]
        assert isinstance(raw, list)
        return [str(item) for item in raw]


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        # The cores this process may run on (a container's CPU set), not the machine's.
        return len(os.sched_getaffinity(0))
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


def _check_ca_file(path: str) -> None:
    try:
        make_ssl_context(ca_file=path)
    except FileNotFoundError:
        raise ConfigError(f"--ca-file: {path!r} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--ca-file: {path!r} holds no usable CA certificate ({exc})") from None


def _configure_logging(level: str, *, workers: int = 1) -> None:
    # With several workers, each line says which process wrote it.
    process = " [%(process)d]" if workers > 1 else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _drop_privileges(user: str) -> None:
    """Become ``user`` (and its group, no others) once the sockets are bound.

    Error handling: raises :class:`ConfigError` for an unknown user, or when not root and
    not already that user.
    """
    try:
        record = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user: no such user {user!r}") from None
    if os.geteuid() == record.pw_uid:
        return
    if os.geteuid() != 0:
        raise ConfigError(f"--user: only root can become {user!r}; start as root or drop --user")
    # Codecs load on first use, from the Python installation, which the new user may not be
    # allowed to read (a Python under /root): the socket module encodes every host name it
    # dials with "idna", so load that codec now, while still root.
    codecs.lookup("idna")
    os.setgroups([])
    os.setgid(record.pw_gid)
    os.setuid(record.pw_uid)
    log.info("running as user %s (uid %d, gid %d)", user, record.pw_uid, record.pw_gid)


def _check(args: list[str]) -> NoReturn:
    try:
        config = build_config(args, os.environ)
    except ConfigError as exc:
        print(f"dot-proxy check: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(trio.run(run_check, config))


async def _run(config: Config, sockets: list[socket.socket], parent: int | None = None) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        if parent is not None:
            nursery.start_soon(watch_parent, parent, stop)
        await serve(config, sockets=sockets, stop=stop)
        nursery.cancel_scope.cancel()


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


def main(argv: Sequence[str] | None = None) -> None:
    """Run the proxy until SIGINT or SIGTERM; exit 2 with one line for a bad setting.

    ``dot-proxy check [flags]`` instead checks each upstream once and exits 0 if all work.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        _check(args[1:])
    try:
        config = build_config(args, os.environ)
        _configure_logging(config.log_level, workers=config.workers)
        socket_sets = bind_worker_sockets(config)
        if config.user is not None:
            _drop_privileges(config.user)
    except ConfigError as exc:
        print(f"dot-proxy: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    # What exists now (modules, config, sockets) lives as long as the process: keep it out of
    # the cyclic collector's full passes. They scanned all of it each time failing upstreams
    # left a few thousand exception cycles behind: 30-70 ms pauses in the soak, enough for
    # the UDP socket to overflow. Before forking, it also keeps workers' pages shared.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if len(socket_sets) == 1:
        trio.run(_run, config, socket_sets[0])
        log.info("stopped")
        return
    status = run_workers(socket_sets, _serve_worker(config))
    log.info("stopped")
    sys.exit(status)
