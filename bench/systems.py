"""The systems ``bench/run_bench.py`` measures: which there are, and how each is started and
made ready (the caching ones filled before anything is recorded).

Two kinds of rows, besides the bare loop:

- forwarding: every query goes upstream. dot-proxy runs with ``--cache-size 0`` here, so that
  a name the query file repeats is forwarded again, as stubby and dnsdist (no packet cache) do;
- cache: a small set of names, each answered once before measuring, asked again and again:
  dot-proxy with its default cache, dnsdist with its packet cache, and a second unbound
  forwarding to the first over DoT, answering from its cache. stubby has no cache: no row.

``bare-loop`` is ``investigations/trio_floor.py``'s bare shape (read a burst of datagrams,
answer each in place, no DNS work), with the proxy's burst: the ceiling of a hit answered in
dot-proxy's UDP serve loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ab import ProxyFrom, worktree
from investigations.trio_floor import responder
from report import Fill, Target

from dot_proxy.serve.udp import BURST
from dot_proxy.testing import realdns

ROOT = Path(__file__).resolve().parents[1]

FORWARDING = (
    "dot-proxy",
    "dot-proxy-no-padding",
    "dot-proxy-workers-2",
    "stubby",
    "dnsdist",
    "limit",
)
CACHE = ("dot-proxy-cache", "dnsdist-cache", "unbound-cache", "bare-loop")
SYSTEMS = FORWARDING + CACHE
# --only: the cache rows come with the forwarding rows their targets are ratios to.
ONLY = {"forwarding": FORWARDING, "cache": ("dot-proxy", "stubby", *CACHE)}
# dot-proxy variants: what each adds to its command line.
VARIANT_FLAGS = {
    "dot-proxy-no-padding": ["--no-padding"],
    # Two processes on one port (SO_REUSEPORT); CPU and RSS are summed over the workers.
    "dot-proxy-workers-2": ["--workers", "2"],
}
# Last on a forwarding row's command line, so that no --proxy-args turns its cache back on.
NO_CACHE = ["--cache-size", "0"]
# dnsdist stores nothing more once its packet cache is full (it does not evict), and keeps
# UDP and TCP answers apart: twice what is filled leaves room for every name on both.
DNSDIST_CACHE_ENTRIES = 20_000
# 5,000 hosts: 10,500 distinct names with data, more than dot-proxy's default cache holds
# (10,000), so that it is full. A TTL longer than a whole run: no cached answer expires (or
# is prefetched) while it is measured. The forwarding rows' query file keeps to the first
# 3,000 hosts, as before.
ZONE = realdns.Zone(hosts=5000, ttl=3600)
# About how long filling one caching system takes (10,500 forwarded queries, then 200 hits).
FILL_SECONDS = 3
# Debian packages that provide each program the selected systems need.
PACKAGES = {
    "unbound": "unbound",
    "unbound-control": "unbound",
    "dnsperf": "dnsperf",
    "stubby": "stubby",
    "dnsdist": "dnsdist",
}


@dataclass(frozen=True, slots=True)
class QueryFiles:
    forwarding: Path  # many names, mostly distinct: forwarded
    hits: Path  # few names, each answered once before measuring: cache hits
    fill: Path  # every name of the zone once: fills a cache

    def for_target(self, target: Target) -> Path:
        return self.forwarding if target.kind == "forwarding" else self.hits


def write_query_files(workdir: Path) -> QueryFiles:
    hits, fill = realdns.write_cache_queries(workdir, ZONE)
    return QueryFiles(realdns.write_queries(workdir / "queries.txt"), hits, fill)


def kind_of(name: str) -> str:
    if name == "bare-loop":
        return "floor"
    return "cache" if name in CACHE else "forwarding"


def ensure_tools(systems: Sequence[str]) -> None:
    """Install the Debian packages the selected systems need, when root; else exit with a hint."""
    needed = ["unbound", "unbound-control", "dnsperf"]
    needed += [name for name in ("stubby", "dnsdist") if name in systems]
    needed += ["dnsdist"] if "dnsdist-cache" in systems else []
    missing = realdns.missing_tools(*dict.fromkeys(needed))
    if not missing:
        return
    packages = sorted({PACKAGES[name] for name in missing})
    if os.geteuid() != 0:
        sys.exit(
            f"missing: {', '.join(missing)}; run: sudo apt-get install -y {' '.join(packages)}"
        )
    print(f"installing {' '.join(packages)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    still = realdns.missing_tools(*needed)
    if still:
        sys.exit(f"still missing after apt-get: {', '.join(still)}")


def has_cache_flag(revision: str) -> bool:
    """Whether dot-proxy at ``revision`` knows ``--cache-size`` (older builds have no cache)."""
    grep = ["git", "-C", str(ROOT), "grep", "-q", "-F", "-e", "--cache-size", revision]
    grep += ["--", "dot_proxy"]
    return subprocess.run(grep, capture_output=True, check=False).returncode == 0


def start_targets(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    pki: realdns.Pki,
    unbound: realdns.Unbound,
    workdir: Path,
) -> list[Target]:
    """Start every selected system; the stack stops them."""
    targets = []
    for name in args.systems:
        if name == "limit":
            targets.append(
                Target(
                    "limit",
                    unbound.tls_port,
                    ("dot",),
                    unbound.pid,
                    unbound.command,
                    (unbound.config_file,),
                )
            )
            continue
        if name == "bare-loop":
            loop = stack.enter_context(responder("bare", burst=BURST))
            targets.append(Target(name, loop.port, ("udp",), loop.pid, loop.command, kind="floor"))
            print(f"started {name} on port {loop.port}: {loop.command}", flush=True)
            continue
        server = _server(stack, name, args, pki, unbound, workdir / name)
        stack.enter_context(server)
        config = getattr(server, "config_file", None)
        targets.append(
            Target(
                name,
                server.port,
                ("udp", "tcp"),
                server.pid,
                server.command,
                () if config is None else (config,),
                kind=kind_of(name),
            )
        )
        print(f"started {name} on port {server.port}: {server.command}", flush=True)
    return targets


def _server(
    stack: contextlib.ExitStack,
    name: str,
    args: argparse.Namespace,
    pki: realdns.Pki,
    unbound: realdns.Unbound,
    workdir: Path,
) -> realdns.DotProxy | realdns.Stubby | realdns.Dnsdist | realdns.UnboundForwarder:
    proxy_args = shlex.split(args.proxy_args)
    upstream = unbound.upstream_spec
    if name == "stubby":
        return realdns.Stubby(pki, unbound.tls_port, workdir=workdir)
    if name in ("dnsdist", "dnsdist-cache"):
        entries = DNSDIST_CACHE_ENTRIES if name == "dnsdist-cache" else 0
        return realdns.Dnsdist(pki, unbound.tls_port, packet_cache=entries, workdir=workdir)
    if name == "unbound-cache":
        return realdns.UnboundForwarder(pki, unbound.tls_port, workdir=workdir)
    if name == "dot-proxy-cache":
        return realdns.DotProxy(pki, upstream, extra_args=proxy_args, workdir=workdir)
    if args.baseline and name == args.baseline_name:
        source = stack.enter_context(worktree(args.baseline))
        extra = [*proxy_args, *(NO_CACHE if has_cache_flag(args.baseline) else [])]
        return ProxyFrom(source, pki, upstream, extra_args=extra, workdir=workdir)
    extra = [*proxy_args, *VARIANT_FLAGS.get(name, []), *NO_CACHE]
    return realdns.DotProxy(pki, upstream, extra_args=extra, workdir=workdir)


def upstream_queries(unbound: realdns.Unbound) -> int:
    """Queries the upstream unbound has been asked since it started."""
    return int(unbound.statistics()["total.num.queries"])


def fill_caches(
    targets: Sequence[Target],
    files: QueryFiles,
    clients: int,
    count_upstream: Callable[[], int],
) -> list[Fill]:
    """Fill each caching system with every name of the zone, then ask each hit name once on
    each transport; what it cost upstream and the RSS after."""
    fills = []
    for target in targets:
        if target.kind != "cache":
            continue
        before = count_upstream()
        fill = realdns.run_dnsperf(
            target.port, files.fill, mode="udp", clients=clients, seconds=300, extra=("-n", "1")
        )
        warm = [
            realdns.run_dnsperf(
                target.port, files.hits, mode=transport, clients=1, seconds=60, extra=("-n", "1")
            )
            for transport in target.transports
        ]
        fills.append(
            Fill(
                target=target.name,
                command=fill.command,
                sent=fill.queries_sent,
                answered=fill.rcodes.get("NOERROR", 0),
                warm_commands=tuple(run.command for run in warm),
                upstream_queries=count_upstream() - before,
                rss=realdns.rss_bytes(target.pid),
            )
        )
        print(
            f"filled {target.name}: {fill.queries_sent} names sent, "
            f"{fill.rcodes.get('NOERROR', 0)} answered NOERROR, "
            f"{fills[-1].upstream_queries} upstream queries, "
            f"RSS {fills[-1].rss / 2**20:.1f} MiB",
            flush=True,
        )
    return fills
