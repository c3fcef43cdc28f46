"""Settings from their sources: flags, ``DOT_PROXY_*`` variables, a config file, defaults.

A :class:`Lookup` takes each setting from the first source that has it (flags, then the
environment, then the file), converts it, and remembers where it came from, so that every
error names the setting as the user gave it; :func:`settings` turns a lookup into a
:class:`Config`. ``cli`` builds the lookups.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol, TypeVar

from dot_proxy.config import (
    DEFAULT_UPSTREAMS,
    Config,
    flag,
    parse_allow,
    parse_forward,
    parse_listen_address,
    parse_metrics_address,
    parse_upstream,
    read_hosts,
)
from dot_proxy.config_file import read_setting_file
from dot_proxy.core.hosts import HostsProblem, HostsTable
from dot_proxy.cpus import usable_cores
from dot_proxy.errors import ConfigError
from dot_proxy.upstream.tls import make_ssl_context

__all__ = ["Environment", "Flags", "Lookup", "Source", "settings"]

ENV_PREFIX = "DOT_PROXY_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
T = TypeVar("T")


def settings(value: Lookup, *, read_files: bool = True) -> Config:
    """The Config ``value`` finds (defaults for the rest), validated; ``read_files=False``
    leaves the CA file and the hosts file unread (a reload: the running proxy keeps its
    readings, and re-reads the hosts file itself)."""
    ca_file = value.one("ca-file", str, None)
    ca_data = None
    if ca_file is not None and read_files:
        ca_data = _read_ca_file(ca_file, value.where("ca-file"))
    hosts_file = value.one("hosts", str, None)
    hosts_table: HostsTable | None = None
    hosts_problems: list[HostsProblem] = []
    if hosts_file is not None and read_files:
        # Read now, as the CA file is (before --user): unreadable exits 2 here; its bad lines
        # are logged when serving starts.
        hosts_table, hosts_problems = read_hosts(hosts_file, where=value.where("hosts"))
    log_level = value.one("log-level", str.upper, "INFO")
    if log_level not in LOG_LEVELS:
        raise ConfigError(
            f"{value.where('log-level')}: {log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    defaults = Config(upstreams=(parse_upstream(DEFAULT_UPSTREAMS[0]),))
    upstreams = value.many("upstream", list(DEFAULT_UPSTREAMS))
    listen = value.many("listen", list(defaults.listen))
    allow = value.many("allow", list(defaults.allow))
    metrics = value.one("metrics", str, None)
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
        metrics=None
        if metrics is None
        else parse_metrics_address(metrics, where=value.where("metrics")),
        log_format=value.one("log-format", str.lower, defaults.log_format),
        forward=tuple(parse_forward(text, where=value.where("forward")) for text in forwards),
        hosts_file=hosts_file,
        hosts_table=hosts_table,
        hosts_problems=tuple(hosts_problems),
        local_zones=not value.one("no-local-zones", _boolean, False),
        keep_ecs=value.one("keep-ecs", _boolean, False),
        origins=MappingProxyType(value.origins),
    )


class Source(Protocol):
    """Where settings come from: flags, the environment, a config file (ConfigFile)."""

    def get(self, option: str) -> tuple[str, object] | None:
        """``(name, raw value)`` for ``option`` ("hedge-after") if this source sets it.

        ``name`` is how errors name the setting ("--hedge-after", "DOT_PROXY_HEDGE_AFTER",
        "FILE: hedge-after"); the raw value is text, a list of texts for a repeatable flag,
        or a typed value (a config file's number or boolean).
        """


class Flags:
    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args

    def get(self, option: str) -> tuple[str, object] | None:
        given = getattr(self._args, option.replace("-", "_"), None)
        return None if given is None else (flag(option), given)


class Environment:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, option: str) -> tuple[str, object] | None:
        variable = ENV_PREFIX + option.replace("-", "_").upper()
        text = self._environ.get(variable, "").strip()
        return (variable, text) if text else None  # blank counts as unset


class Lookup:
    """Each setting from the first source that has it, else its default; converted, with
    errors naming the setting as that source does. Remembers where each value came from."""

    def __init__(self, sources: Sequence[Source], *, known: Mapping[str, object]) -> None:
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
        text = read_setting_file(path, where).decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path!r} is not PEM text") from None
    try:
        make_ssl_context(ca_file=path, ca_data=text)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}: {path!r} holds no usable CA certificate ({exc})") from None
    return text
