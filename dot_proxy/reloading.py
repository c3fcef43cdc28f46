"""Reload on SIGHUP: re-read the config file, keep what needs a restart, apply the rest.

The configuration is rebuilt as at the start (flags, then environment, then the file, then
defaults: the flags and variables the process started with still win over the file), and
checked whole. A file that does not read or check is logged in one line and counted
(``dot_proxy_config_reloads_total{result="error"}``); the running configuration stays.

Settings that the running process cannot take are logged as needing a restart and left as
they were: the sockets are bound (``listen``, ``port``, ``metrics``), the workers forked
(``workers``), the user dropped to (``user``, and ``ca-file``, read before the drop), the
in-flight and TCP-client limits are semaphores with slots taken, and the split-DNS zones and
router are built at the start (``forward``, ``hosts``, ``no-local-zones``; the hosts file's
content is re-read on every SIGHUP). Everything else is applied
by :meth:`dot_proxy.serve.running.Running.apply`, and the log level and format here.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable
from typing import Final

import trio

from dot_proxy.config import Config
from dot_proxy.errors import ConfigError
from dot_proxy.logs import configure_logging
from dot_proxy.serve.running import Running

__all__ = ["RESTART_ONLY", "plan_reload", "reload", "reload_on_sighup"]

log = logging.getLogger("dot_proxy")

#: Config fields a reload leaves as they are, with the option that sets each.
RESTART_ONLY: Final = {
    "listen": "listen",
    "port": "port",
    "metrics": "metrics",
    "workers": "workers",
    "user": "user",
    "ca_file": "ca-file",
    "ca_data": "ca-file",
    "max_in_flight": "max-in-flight",
    "max_tcp_clients": "max-tcp-clients",
    "config_file": "config",
    # Split DNS: the zones' upstream groups and the router are built at the start. (The hosts
    # file's content is re-read on SIGHUP and on change; its name is kept.)
    "forward": "forward",
    "hosts_file": "hosts",
    "local_zones": "no-local-zones",
}
Rebuild = Callable[[Config], Config]


def plan_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What to run with after a reload from ``old`` to ``new``: ``new`` with the restart-only
    settings kept from ``old``; the options that changed but need a restart; the options
    changed and applied."""
    kept = {
        name: getattr(old, name)
        for name in RESTART_ONLY
        if getattr(old, name) != getattr(new, name)
    }
    applied = dataclasses.replace(new, **kept)
    restart = sorted({RESTART_ONLY[name] for name in kept})
    changed = [
        field.name.replace("_", "-")
        for field in dataclasses.fields(Config)
        if field.compare and getattr(old, field.name) != getattr(applied, field.name)
    ]
    return applied, restart, changed


async def reload(running: Running, rebuild: Rebuild) -> bool:
    """One reload of ``running``'s config file with ``rebuild(running.config)``; True if it
    was applied (False without a config file)."""
    old = running.config
    if old.config_file is None:
        return False
    try:
        new = rebuild(old)
    except ConfigError as exc:
        running.reloads["error"] += 1
        log.error("reload failed, the running configuration stays: %s", exc)  # noqa: TRY400
        return False
    applied, restart, changed = plan_reload(old, new)
    for option in restart:
        log.warning(
            "reload: %s changed, which takes a restart; the running value is kept",
            new.name_of(option.replace("_", "-")),
        )
    configure_logging(applied.log_level, applied.log_format, workers=applied.workers)
    await running.apply(applied)
    running.reloads["success"] += 1
    log.info("reloaded %s: %s", old.config_file, ", ".join(changed) or "nothing changed")
    return True


async def reload_on_sighup(running: Running, rebuild: Rebuild) -> None:
    """Reload ``running`` on every SIGHUP, one reload at a time, until cancelled: the config
    file, then the hosts file (``--hosts``), which is also re-read whenever it changes."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            config = running.config
            if config.config_file is None and config.hosts_file is None:
                log.warning("SIGHUP: there is no --config file to re-read; nothing changed")
                continue
            await reload(running, rebuild)
            if running.config.hosts_file is not None:
                log.info("SIGHUP: re-reading the hosts file")
                await running.resolver.routes.reload_hosts()
