"""Command line: flags, ``DOT_PROXY_*`` environment, a config file and defaults → one Config.

Precedence is flag, then environment variable, then the ``--config`` file, then default; a
list given by a flag or variable replaces the file's. A value that cannot be used ends the
program with one line on stderr naming the setting as the user gave it (the flag, the
variable, or ``FILE: key``), and exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import gc
import logging
import os
import pwd
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import NoReturn

import trio

from dot_proxy import __version__
from dot_proxy.check import make_test_query, run_check
from dot_proxy.config import (
    Config,
)
from dot_proxy.config_file import ConfigFile
from dot_proxy.errors import ConfigError
from dot_proxy.healthcheck import run_healthcheck
from dot_proxy.logs import configure_logging
from dot_proxy.runner import Launch, run
from dot_proxy.serve.activation import adopt_sockets, take_listen_fds
from dot_proxy.serve.ops_http import bind_ops_socket
from dot_proxy.serve.sockets import bind_worker_sockets
from dot_proxy.settings import Environment, Flags, Lookup, Source, settings

__all__ = ["build_config", "main"]

log = logging.getLogger("dot_proxy")

EXIT_USAGE = 2
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
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (keys: the long flag names); flags and "
        "DOT_PROXY_* variables win over it; SIGHUP re-reads it. `dot-proxy check-config "
        "FILE` checks one",
    )
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
    add("--log-format", metavar="FORMAT", help="text or json, one object a line (default: text)")
    add(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve HTTP on ADDR:PORT: /metrics (Prometheus), /healthz, /readyz "
        "(default: off; e.g. 127.0.0.1:9153)",
    )
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
        help="answer the names and addresses of this /etc/hosts-format file here; re-read "
        "when it changes and on SIGHUP",
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


def build_config(
    argv: Sequence[str], environ: Mapping[str, str], *, read_files: bool = True
) -> Config:
    """Turn arguments, environment and the ``--config`` file into a validated :class:`Config`.

    ``read_files=False`` leaves the CA file and the hosts file unread (a reload, which keeps
    the CA read at the start and re-reads the hosts file itself). Error handling: raises
    :class:`ConfigError` naming the flag, the environment variable or ``FILE: key`` the bad
    value came from. Every key of the file is checked, including those a flag or variable
    overrides.
    """
    return _config_from(_parser().parse_args(argv), environ, read_files=read_files)


def check_config_file(path: str) -> Config:
    """The configuration ``path`` gives on its own (defaults for the rest), checked whole.

    Error handling: raises :class:`ConfigError` naming ``FILE: key``.
    """
    return settings(Lookup([ConfigFile.load(path)], known=vars(_parser().parse_args([]))))


def _config_from(
    args: argparse.Namespace, environ: Mapping[str, str], *, read_files: bool = True
) -> Config:
    sources: list[Source] = [Flags(args), Environment(environ)]
    where = Lookup(sources, known=vars(args))
    path = where.one("config", str, None)
    if path is None:
        return settings(Lookup(sources, known=vars(args)), read_files=read_files)
    file = ConfigFile.load(path, where=where.where("config"))
    # The file must be right on its own: a bad key stops the start even where a flag or a
    # variable overrides it, rather than waiting for the day that flag is dropped.
    settings(Lookup([file], known=vars(args)), read_files=False)
    config = settings(Lookup([*sources, file], known=vars(args)), read_files=read_files)
    return dataclasses.replace(config, config_file=path)


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


def _usage_error(command: str, error: ConfigError) -> NoReturn:
    print(f"dot-proxy {command}: {error}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _check(argv: list[str]) -> NoReturn:
    try:
        args = _check_parser().parse_args(argv)
        config = _config_from(args, os.environ)
        query = make_test_query(args.query)
    except ConfigError as exc:
        _usage_error("check", exc)
    sys.exit(trio.run(partial(run_check, config, query=query)))


def _check_config(argv: list[str]) -> NoReturn:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(
            "usage: dot-proxy check-config FILE  (checks a --config file: exit 0 if every "
            "key is known and every value good, 2 with one line naming the first that is not)",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)
    try:
        config = check_config_file(argv[0])
    except ConfigError as exc:
        _usage_error("check-config", exc)
    given = len(ConfigFile.load(argv[0]).values)
    print(f"{argv[0]}: ok ({given} settings; {len(config.upstreams)} upstream(s))")
    sys.exit(0)


def _healthcheck(argv: list[str]) -> NoReturn:
    # The server's own flags and variables: it asks the proxy they describe.
    try:
        config = build_config(argv, os.environ)
    except ConfigError as exc:
        _usage_error("healthcheck", exc)
    sys.exit(trio.run(run_healthcheck, config))


# `dot-proxy NAME [flags]`: a different job, an exit status.
SUBCOMMANDS: dict[str, Callable[[list[str]], NoReturn]] = {
    "check": _check,
    "healthcheck": _healthcheck,
    "check-config": _check_config,
}


def _rebuild(args: Sequence[str], environ: Mapping[str, str]) -> Callable[[Config], Config]:
    """Build the configuration again as at the start, the config file re-read (a reload)."""

    def rebuild(old: Config) -> Config:
        new = build_config(args, environ, read_files=False)
        if new.ca_file == old.ca_file:
            # Read at the start, perhaps as root: a reload keeps that reading.
            new = dataclasses.replace(new, ca_data=old.ca_data)
        return new

    return rebuild


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

    ``dot-proxy check [flags]`` instead checks each upstream once and exits 0 if all work;
    ``dot-proxy check-config FILE`` checks a config file without starting;
    ``dot-proxy healthcheck [flags]`` asks the proxy those flags describe whether it serves.
    Started by a systemd socket unit, it serves the sockets passed (``LISTEN_FDS``) and
    tells systemd when it is ready (``NOTIFY_SOCKET``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]](args[1:])
    environ = dict(os.environ)
    try:
        config = build_config(args, environ)
        configure_logging(config.log_level, config.log_format, workers=config.workers)
        socket_sets = _listening_sockets(config)
        ops_socket = None
        if config.metrics is not None:
            ops_socket = bind_ops_socket(config.metrics, config.name_of("metrics"))
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
    status = run(Launch(config, _rebuild(args, environ), ops_socket), socket_sets)
    log.info("stopped")
    if status:
        sys.exit(status)
