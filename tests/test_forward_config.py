"""--forward, --hosts, --no-local-zones and --keep-ecs: parsing, environment, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dot_proxy import cli
from dot_proxy.cli import build_config
from dot_proxy.config import (
    Config,
    ForwardZone,
    PlainSpec,
    UpstreamSpec,
    cleartext_zones,
    parse_forward,
    parse_upstream,
    read_hosts,
)
from dot_proxy.core.zones import name_to_wire
from dot_proxy.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "zone", "targets"),
    [
        ("home.arpa=plain:192.168.1.1", "home.arpa", (PlainSpec("192.168.1.1", 53),)),
        ("Home.Arpa.=PLAIN:192.168.1.1:5353", "home.arpa", (PlainSpec("192.168.1.1", 5353),)),
        ("lan=plain:[fd00::1]:53", "lan", (PlainSpec("fd00::1", 53),)),
        ("lan=plain:[FD00::1]", "lan", (PlainSpec("fd00::1", 53),)),
        ("lan=plain:fd00::1", "lan", (PlainSpec("fd00::1", 53),)),
        (
            "corp.example=10.8.0.1:853#dns.corp.example",
            "corp.example",
            (UpstreamSpec("10.8.0.1", 853, "dns.corp.example"),),
        ),
        (
            " corp.example = 10.8.0.1#dns.corp.example | 10.8.0.2:8853#dns.corp.example ",
            "corp.example",
            (
                UpstreamSpec("10.8.0.1", 853, "dns.corp.example"),
                UpstreamSpec("10.8.0.2", 8853, "dns.corp.example"),
            ),
        ),
        (
            "168.192.in-addr.arpa=plain:192.168.1.1|plain:192.168.1.2:5353",
            "168.192.in-addr.arpa",
            (PlainSpec("192.168.1.1", 53), PlainSpec("192.168.1.2", 5353)),
        ),
        (".=plain:127.0.0.1:5300", ".", (PlainSpec("127.0.0.1", 5300),)),
        ("_tcp.lan=plain:10.0.0.1", "_tcp.lan", (PlainSpec("10.0.0.1", 53),)),
    ],
)
def test_forward_specs(text: str, zone: str, targets: tuple[UpstreamSpec | PlainSpec, ...]) -> None:
    forward = parse_forward(text)
    assert forward == ForwardZone(name_to_wire(zone), targets)
    assert forward.name == ("." if zone == "." else zone.lower() + ".")
    assert forward.cleartext == any(isinstance(target, PlainSpec) for target in targets)


def test_pins_and_ports_as_for_upstream() -> None:
    pin = "A" * 43 + "="
    [target] = parse_forward(f"corp=[2001:db8::53]:853#dns.corp^{pin}").targets
    assert target == parse_upstream(f"[2001:db8::53]:853#dns.corp^{pin}")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("home.arpa", "ZONE=UPSTREAM"),
        ("=plain:10.0.0.1", "ZONE=UPSTREAM"),
        ("home.arpa=", "ZONE=UPSTREAM"),
        ("home..arpa=plain:10.0.0.1", "not a zone name"),
        ("hôme.arpa=plain:10.0.0.1", "not a zone name"),
        ("lan=plain:router.lan", "not an IP address"),
        ("lan=plain:10.0.0.1#router.lan", "no name or pin"),
        ("lan=plain:10.0.0.1:99999", "port"),
        ("lan=plain:[fd00::1", "IPv6"),
        ("lan=plain:10.0.0.1||plain:10.0.0.2", "empty upstream"),
        ("lan=plain:10.0.0.1|plain:10.0.0.1:53", "listed twice"),
        ("lan=dns.google#dns.google", "not an IP address"),
        ("lan=10.0.0.1#r.lan|plain:10.0.0.1", "mixes TLS and plain"),
    ],
)
def test_bad_forward_values_name_the_flag(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_forward(text)
    message = str(raised.value)
    assert message.startswith("--forward: ")
    assert needle in message
    assert "\n" not in message


def test_forward_flags_and_environment() -> None:
    config = build_config(
        ["--forward", "home.arpa=plain:192.168.1.1", "--forward", "corp=10.8.0.1#dns.corp"], {}
    )
    assert [forward.name for forward in config.forward] == ["home.arpa.", "corp."]
    from_env = build_config(
        [], {"DOT_PROXY_FORWARD": "home.arpa=plain:192.168.1.1, corp=10.8.0.1#dns.corp"}
    )
    assert from_env.forward == config.forward
    # A flag wins over the variable, as for every flag.
    flagged = build_config(["--forward", "lan=plain:10.0.0.1"], {"DOT_PROXY_FORWARD": "x=1.2.3.4"})
    assert [forward.name for forward in flagged.forward] == ["lan."]
    assert build_config([], {}).forward == ()


def test_a_zone_given_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--forward: zone lan\. is given twice"):
        build_config(["--forward", "lan=plain:10.0.0.1", "--forward", "LAN.=plain:10.0.0.2"], {})


def test_switches() -> None:
    config = build_config([], {})
    assert (config.local_zones, config.keep_ecs, config.hosts_file) == (True, False, None)
    config = build_config(["--no-local-zones", "--keep-ecs"], {})
    assert (config.local_zones, config.keep_ecs) == (False, True)
    config = build_config([], {"DOT_PROXY_NO_LOCAL_ZONES": "yes", "DOT_PROXY_KEEP_ECS": "1"})
    assert (config.local_zones, config.keep_ecs) == (False, True)
    config = build_config([], {"DOT_PROXY_NO_LOCAL_ZONES": "0", "DOT_PROXY_KEEP_ECS": "off"})
    assert (config.local_zones, config.keep_ecs) == (True, False)


def test_hosts_file_from_flag_or_environment(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\nnonsense line\n")
    assert build_config(["--hosts", str(hosts)], {}).hosts_file == str(hosts)
    assert build_config([], {"DOT_PROXY_HOSTS": str(hosts)}).hosts_file == str(hosts)
    table, problems = read_hosts(str(hosts))
    assert name_to_wire("printer.lan") in table.names
    assert [problem.line for problem in problems] == [2]


def test_the_hosts_file_is_read_at_start_into_the_config(tmp_path: Path) -> None:
    # Read while the process may still read it (before --user), as the CA file is; its
    # problems wait in the config for the start-up log.
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\nnonsense line\n")
    config = build_config(["--hosts", str(hosts)], {})
    assert config.hosts_table is not None
    assert name_to_wire("printer.lan") in config.hosts_table.names
    assert [problem.line for problem in config.hosts_problems] == [2]
    assert build_config([], {}).hosts_table is None


def test_errors_name_the_variable_a_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^DOT_PROXY_HOSTS: .* does not exist"):
        build_config([], {"DOT_PROXY_HOSTS": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"^DOT_PROXY_FORWARD: 'lan=plain:router'"):
        build_config([], {"DOT_PROXY_FORWARD": "lan=plain:router"})
    with pytest.raises(ConfigError, match=r"^DOT_PROXY_FORWARD: .*'nope' is not an IP address"):
        build_config([], {"DOT_PROXY_FORWARD": "corp=nope#dns.corp"})


def test_hosts_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--hosts: .* does not exist"):
        build_config(["--hosts", str(tmp_path / "missing")], {})
    with pytest.raises(ConfigError, match=r"--hosts: .* cannot be read"):
        build_config(["--hosts", str(tmp_path)], {})  # a directory


def test_hosts_file_that_is_not_utf8_loses_only_its_bad_lines(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_bytes(b"10.0.0.1 caf\xe9.lan\n10.0.0.2 ok.lan\n")
    table, problems = read_hosts(str(hosts))
    assert name_to_wire("ok.lan") in table.names
    assert [problem.line for problem in problems] == [1]


def test_cleartext_zones_are_named_for_the_log() -> None:
    config = Config(
        upstreams=(parse_upstream("1.1.1.1#one.one.one.one"),),
        forward=(
            parse_forward("home.arpa=plain:192.168.1.1|plain:[fd00::1]:5353"),
            parse_forward("corp=10.8.0.1#dns.corp"),
        ),
    )
    [line] = cleartext_zones(config)
    assert "home.arpa." in line
    assert "CLEARTEXT" in line
    assert "plain:192.168.1.1:53, plain:[fd00::1]:5353" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--forward", "lan"], "--forward"),
        (["--forward", "lan=plain:router"], "--forward"),
        (["--hosts", "/nonexistent/hosts"], "--hosts"),
        (["--no-local-zones", "maybe"], "unrecognized"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert needle in lines[0]


def test_every_forward_in_the_readme_parses() -> None:
    # What users paste: the home-router and VPN examples must be accepted as written.
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    values = re.findall(r"--forward ([^\s`\\]+)", readme)
    assert "home.arpa=plain:192.168.1.1" in values
    assert "corp.example=10.8.0.1:853#dns.corp.example" in values
    for value in values:
        if "=" in value and "SPEC" not in value and "..." not in value:  # not placeholders
            build_config(["--forward", value], {})
