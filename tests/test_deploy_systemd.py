"""deploy/systemd: what the units promise, read from the files (systemd-analyze: e2e)."""

from __future__ import annotations

import ipaddress
import shlex
from collections import defaultdict
from pathlib import Path

import pytest

from dot_proxy.cli import build_config, check_config_file
from dot_proxy.config_file import ConfigFile

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"

Unit = dict[str, dict[str, list[str]]]


def read_unit(path: Path) -> Unit:
    """Sections → key → every value given, in order (systemd keys repeat; an empty one resets)."""
    unit: Unit = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values = unit[section][key.strip()]
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


SERVICE = read_unit(UNITS / "dot-proxy.service")["Service"]
SOCKET = read_unit(UNITS / "dot-proxy.socket")["Socket"]
NO_SOCKET = read_unit(UNITS / "no-socket.conf")["Service"]


def test_the_socket_unit_binds_53_over_udp_and_tcp_on_ipv4_and_ipv6() -> None:
    for kind in ("ListenDatagram", "ListenStream"):
        addresses = SOCKET[kind]
        assert all(address.endswith(":53") for address in addresses), addresses
        assert any(address.startswith("[") for address in addresses), f"{kind}: no IPv6"
        assert any(address[0].isdigit() for address in addresses), f"{kind}: no IPv4"
    assert SOCKET["BindIPv6Only"] == ["ipv6-only"]


def test_the_service_runs_as_nobody_in_particular_with_no_capability() -> None:
    assert SERVICE["Type"] == ["notify"]
    assert SERVICE["DynamicUser"] == ["yes"]
    assert "CapabilityBoundingSet" in SERVICE and SERVICE["CapabilityBoundingSet"] == []
    assert SERVICE.get("AmbientCapabilities", []) == []
    assert SERVICE["NoNewPrivileges"] == ["yes"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallArchitectures", "native"),
        ("RestrictNamespaces", "yes"),
    ],
)
def test_the_service_is_hardened(key: str, value: str) -> None:
    assert SERVICE[key] == [value]


def test_system_calls_are_those_of_a_service() -> None:
    assert SERVICE["SystemCallFilter"][0] == "@system-service"
    assert all(rule.startswith("~") for rule in SERVICE["SystemCallFilter"][1:])


def test_its_command_line_is_one_the_proxy_accepts() -> None:
    argv = shlex.split(SERVICE["ExecStart"][0])
    assert argv[0] == "/opt/dot-proxy/bin/dot-proxy"
    config = build_config(argv[1:], {})
    assert (config.listen, config.port) == (("127.0.0.1", "::1"), 53)


def test_without_the_socket_unit_it_gets_exactly_the_one_capability() -> None:
    assert NO_SOCKET["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert NO_SOCKET["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert NO_SOCKET["PrivateUsers"] == ["no"]  # a capability in its own namespace binds nothing


def test_reload_is_sighup_to_the_main_process() -> None:
    # The supervisor of --workers passes it on; a single process reloads itself.
    assert SERVICE["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_the_example_config_file_is_one_the_service_accepts() -> None:
    # Named by DOT_PROXY_CONFIG in /etc/default/dot-proxy, as the unit's comment says; the
    # unit's flags win over it, so it leaves listen and port to them (or to the socket unit).
    path = str(UNITS / "dot-proxy.toml")
    assert (
        "DOT_PROXY_CONFIG=/etc/dot-proxy/dot-proxy.toml"
        in (UNITS / "dot-proxy.service").read_text()
    )
    check_config_file(path)
    assert not {"listen", "port"} & set(ConfigFile.load(path).values)
    argv = shlex.split(SERVICE["ExecStart"][0])
    config = build_config(argv[1:], {"DOT_PROXY_CONFIG": path})
    assert config.config_file == path
    assert (config.listen, config.port) == (("127.0.0.1", "::1"), 53)
    assert config.metrics is not None
    assert ipaddress.ip_address(config.metrics[0]).is_loopback, "no authentication: loopback"
    # The socket unit listens on loopback: so does the access list.
    assert all(ipaddress.ip_network(network)[0].is_loopback for network in config.allow)
