"""The command line: flags, DOT_PROXY_* variables, defaults, errors, signals."""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy import cli
from dot_proxy.cli import build_config
from dot_proxy.config import Config, UpstreamSpec, parse_upstream
from dot_proxy.errors import ConfigError
from dot_proxy.reloading import reload_on_sighup
from dot_proxy.routing import Routes, Target
from dot_proxy.serve import sockets
from dot_proxy.serve.running import Running
from dot_proxy.testing.realdns import bound_pair
from dot_proxy.upstream.group import UpstreamGroup
from tests.processes import HANG_GUARD, ROOT, Proxy, run_dot_proxy

# --- build_config ------------------------------------------------------------------------------


def test_defaults() -> None:
    config = build_config([], {})
    assert config.upstreams == (
        UpstreamSpec("1.1.1.1", 853, "cloudflare-dns.com"),
        UpstreamSpec("1.0.0.1", 853, "cloudflare-dns.com"),
    )
    assert config.listen == ("0.0.0.0", "::")
    assert config.port == 53
    assert config.ca_file is None
    assert config.timeout == 5.0
    assert config.log_level == "INFO"
    assert config.tcp_idle_timeout == 10.0


FLAG_ENV_DEFAULT = [
    # flag, flag value, variable value, attribute, from flag, from variable, default
    ("--port", "5353", "5300", "port", 5353, 5300, 53),
    ("--timeout", "2.5", "7", "timeout", 2.5, 7.0, 5.0),
    ("--log-level", "debug", "warning", "log_level", "DEBUG", "WARNING", "INFO"),
    ("--tcp-idle-timeout", "3", "4.5", "tcp_idle_timeout", 3.0, 4.5, 10.0),
    ("--max-connections", "2", "3", "max_connections", 2, 3, 4),
    ("--max-pipeline", "10", "20", "max_pipeline", 10, 20, 128),
    ("--upstream-idle-timeout", "1", "2", "upstream_idle_timeout", 1.0, 2.0, 10.0),
    ("--max-in-flight", "7", "9", "max_in_flight", 7, 9, 2000),
]


@pytest.mark.parametrize(
    ("flag", "flag_value", "env_value", "attribute", "from_flag", "from_env", "default"),
    FLAG_ENV_DEFAULT,
)
def test_flag_beats_environment_beats_default(
    flag: str,
    flag_value: str,
    env_value: str,
    attribute: str,
    from_flag: object,
    from_env: object,
    default: object,
) -> None:
    variable = "DOT_PROXY_" + flag[2:].replace("-", "_").upper()
    assert getattr(build_config([], {}), attribute) == default
    assert getattr(build_config([], {variable: env_value}), attribute) == from_env
    assert getattr(build_config([flag, flag_value], {variable: env_value}), attribute) == from_flag
    assert getattr(build_config([flag, flag_value], {}), attribute) == from_flag
    # An empty or blank variable counts as unset.
    assert getattr(build_config([], {variable: "  "}), attribute) == default


def test_ca_file_from_flag_or_environment(ca_file: str, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(Path(ca_file).read_bytes())
    assert build_config([], {"DOT_PROXY_CA_FILE": ca_file}).ca_file == ca_file
    assert build_config(["--ca-file", str(other)], {"DOT_PROXY_CA_FILE": ca_file}).ca_file == str(
        other
    )


def test_no_padding_from_flag_or_environment() -> None:
    assert build_config(["--no-padding"], {}).padding is False
    assert build_config([], {"DOT_PROXY_NO_PADDING": "true"}).padding is False
    assert build_config([], {"DOT_PROXY_NO_PADDING": "0"}).padding is True
    assert build_config(["--no-padding"], {"DOT_PROXY_NO_PADDING": "false"}).padding is False


def test_repeatable_flags_keep_their_order() -> None:
    config = build_config(
        [
            "--upstream", "192.0.2.1#one.test",
            "--upstream", "192.0.2.2:8853#two.test",
            "--listen", "127.0.0.1",
            "--listen", "::1",
        ],
        {"DOT_PROXY_UPSTREAM": "192.0.2.9#ignored.test", "DOT_PROXY_LISTEN": "0.0.0.0"},
    )  # fmt: skip
    assert config.upstreams == (
        UpstreamSpec("192.0.2.1", 853, "one.test"),
        UpstreamSpec("192.0.2.2", 8853, "two.test"),
    )
    assert config.listen == ("127.0.0.1", "::1")


def test_comma_separated_lists_from_the_environment() -> None:
    config = build_config(
        [],
        {
            "DOT_PROXY_UPSTREAM": " 192.0.2.1#one.test , [2001:db8::1]:8853#two.test,,",
            "DOT_PROXY_LISTEN": "127.0.0.1, ::1",
        },
    )
    assert config.upstreams == (
        UpstreamSpec("192.0.2.1", 853, "one.test"),
        UpstreamSpec("2001:db8::1", 8853, "two.test"),
    )
    assert config.listen == ("127.0.0.1", "::1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]:853#name.test", UpstreamSpec("::1", 853, "name.test")),
        ("[::1]:8853", UpstreamSpec("::1", 8853, "::1")),
        ("[::1]#name.test", UpstreamSpec("::1", 853, "name.test")),
        ("2606:4700::1111", UpstreamSpec("2606:4700::1111", 853, "2606:4700::1111")),
        (
            "2606:4700::1111#one.one.one.one",
            UpstreamSpec("2606:4700::1111", 853, "one.one.one.one"),
        ),
        (
            "[2606:4700:4700::1111]:853#cloudflare-dns.com",
            UpstreamSpec("2606:4700:4700::1111", 853, "cloudflare-dns.com"),
        ),
        ("9.9.9.9", UpstreamSpec("9.9.9.9", 853, "9.9.9.9")),
        ("9.9.9.9:8853", UpstreamSpec("9.9.9.9", 8853, "9.9.9.9")),
        ("9.9.9.9#dns.quad9.net.", UpstreamSpec("9.9.9.9", 853, "dns.quad9.net")),
    ],
)
def test_upstream_specs(text: str, expected: UpstreamSpec) -> None:
    assert build_config(["--upstream", text], {}).upstreams == (expected,)
    assert build_config([], {"DOT_PROXY_UPSTREAM": text}).upstreams == (expected,)


@pytest.mark.parametrize("text", ["[::1]", "::1", "127.0.0.1"])
def test_listen_addresses(text: str) -> None:
    assert build_config(["--listen", text], {}).listen == (text.strip("[]"),)


BAD_FLAGS = [
    ["--port", "abc"],
    ["--port", "70000"],
    ["--port", "-1"],
    ["--port", "5.5"],
    ["--timeout", "0"],
    ["--timeout", "-1"],
    ["--timeout", "nan"],
    ["--timeout", "inf"],
    ["--timeout", "soon"],
    ["--log-level", "LOUD"],
    ["--upstream", "dns.example"],
    ["--upstream", "192.0.2.1:0"],
    ["--upstream", "192.0.2.1:65536"],
    ["--upstream", "192.0.2.1:dot"],
    ["--upstream", "192.0.2.1#"],
    ["--upstream", "192.0.2.1#not a name"],
    ["--upstream", "[::1"],
    ["--upstream", "[::1]853"],
    ["--upstream", "999.0.0.1"],
    ["--listen", "localhost"],
    ["--listen", "300.1.1.1"],
    ["--ca-file", "/nonexistent/ca.pem"],
    ["--tcp-idle-timeout", "0"],
    ["--upstream-idle-timeout", "-5"],
    ["--max-connections", "0"],
    ["--max-pipeline", "0"],
    ["--max-pipeline", "70000"],
    ["--max-in-flight", "0"],
    ["--max-in-flight", "lots"],
    ["--hedge-after", "-1"],
    ["--hedge-after", "9"],
    ["--allow", "10.0.0.1/8"],
    ["--allow", "10.0.0.0/33"],
    ["--ratelimit", "-1"],
    ["--upstream-policy", "random"],
    ["--workers", "0"],
    ["--max-tcp-clients", "0"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=" ".join)
def test_bad_flag_value_names_the_flag(argv: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(argv, {})
    message = str(raised.value)
    assert message.startswith(argv[0] + ":"), message
    assert "DOT_PROXY_" not in message
    assert "\n" not in message


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=" ".join)
def test_bad_environment_value_names_the_variable_every_time(argv: list[str]) -> None:
    # Whether the conversion, the range check or a relation between settings finds it, the
    # error names where the value came from: the variable, never the flag the user did not use.
    variable = "DOT_PROXY_" + argv[0][2:].replace("-", "_").upper()
    with pytest.raises(ConfigError) as raised:
        build_config([], {variable: argv[1]})
    message = str(raised.value)
    assert message.startswith(variable + ":"), message
    assert argv[0] + ":" not in message
    assert "\n" not in message


def test_a_relation_names_each_setting_where_it_came_from() -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(["--hedge-after", "3"], {"DOT_PROXY_TIMEOUT": "2"})
    assert str(raised.value) == (
        "--hedge-after: 3 must be less than the query timeout (2 s, DOT_PROXY_TIMEOUT), or 0 (off)"
    )


def test_a_negative_hedge_budget_is_called_negative() -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(["--hedge-after", "-1"], {})
    assert str(raised.value) == (
        "--hedge-after: -1 must not be negative (0 or off turns hedging off)"
    )


def test_origins_name_a_setting_from_another_source() -> None:
    # What a config file (or any later source) records in origins is how errors name it.
    with pytest.raises(ConfigError, match=r"^proxy\.toml: timeout: -1 must be a positive"):
        Config(upstreams=UPSTREAMS, timeout=-1, origins={"timeout": "proxy.toml: timeout"})
    assert Config(upstreams=UPSTREAMS).name_of("timeout") == "--timeout"


UPSTREAMS = (UpstreamSpec("192.0.2.1", 853, "one.test"),)


def test_allow_keeps_the_normal_form_and_refuses_host_bits() -> None:
    config = build_config(["--allow", "10.0.0.0/8", "--allow", "192.0.2.7", "--allow", "::1"], {})
    assert config.allow == ("10.0.0.0/8", "192.0.2.7/32", "::1/128")
    with pytest.raises(ConfigError) as raised:
        build_config([], {"DOT_PROXY_ALLOW": "127.0.0.0/8, 10.0.0.1/8"})
    assert str(raised.value) == (
        "DOT_PROXY_ALLOW: '10.0.0.1/8' has host bits set: write the network 10.0.0.0/8, "
        "or 10.0.0.1/32 for the one address"
    )


def test_a_pin_only_upstream_is_shown_without_a_name() -> None:
    pin = "A" * 43 + "="
    pinned = build_config(["--upstream", f"127.0.0.1:8853^{pin}"], {}).upstreams[0]
    assert pinned.label == "127.0.0.1:8853"
    assert pinned.description == "127.0.0.1:8853 ^1 pin(s), no name checked"
    both = build_config(["--upstream", f"[::1]:8853#dns.test^{pin}"], {}).upstreams[0]
    assert both.description == "[::1]:8853#dns.test ^1 pin(s)"
    plain = build_config(["--upstream", "192.0.2.1"], {}).upstreams[0]
    assert plain.description == plain.label == "192.0.2.1:853#192.0.2.1"


def test_help_shows_the_whole_upstream_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--upstream HOST[:PORT][#AUTH_NAME][^PIN]" in shown
    assert "5353" not in shown


def test_check_help_is_the_checks_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: dot-proxy check")
    assert "--upstream HOST[:PORT][#AUTH_NAME][^PIN]" in shown
    assert "--query NAME" in shown
    assert "--workers" not in shown  # the server's flags are not the check's


def test_check_takes_only_its_own_flags_and_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A variable meant for the server (a container's environment) does not stop a check.
    monkeypatch.setenv("DOT_PROXY_PORT", "not a port")
    monkeypatch.setenv("DOT_PROXY_TIMEOUT", "-1")
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "--upstream", "192.0.2.1#one.test"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("dot-proxy check: DOT_PROXY_TIMEOUT: -1")
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "--workers", "2"])
    assert exited.value.code == 2


def test_unusable_ca_file_names_the_flag(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="--ca-file"):
        build_config(["--ca-file", str(junk)], {})


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["--port"], ["--upstream"], ["stray-argument"]],
    ids=" ".join,
)
def test_unknown_or_incomplete_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(argv, {})
    assert argv[0] in str(raised.value)


def test_no_permission_for_a_low_port_says_how_to_choose_another(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tests run as root, so simulate what an unprivileged bind() gets.
    def refuse(address: str, port: int, kind: int, reuse_port: bool) -> socket.socket:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sockets, "_bind_one", refuse)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--listen", "127.0.0.1", "--port", "53"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dot-proxy: --port: no permission to listen on 127.0.0.1:53")
    assert lines[0].endswith("choose another port, e.g. --port 5300")


def test_config_validates_when_built_directly() -> None:
    with pytest.raises(ConfigError, match="--upstream"):
        Config(upstreams=())


# --- as a subprocess ----------------------------------------------------------------------------


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "variables", "needle"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--timeout", "-3"], {}, "--timeout"),
        (["--upstream", "dns.google"], {}, "--upstream"),
        (["--log-level", "chatty"], {}, "--log-level"),
        (["--bogus"], {}, "--bogus"),
        ([], {"DOT_PROXY_PORT": "none"}, "DOT_PROXY_PORT: "),
        ([], {"DOT_PROXY_TIMEOUT": "-1"}, "DOT_PROXY_TIMEOUT: "),
        ([], {"DOT_PROXY_UPSTREAM": "1.1.1.1:99999"}, "DOT_PROXY_UPSTREAM: "),
    ],
)
def test_bad_value_exits_2_with_one_line(
    args: list[str], variables: dict[str, str], needle: str
) -> None:
    _assert_one_line_error(run_dot_proxy(*args, **variables), needle)


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A loopback port with a TCP listener and a UDP socket on it."""
    udp, tcp, port = bound_pair()
    with udp, tcp:
        tcp.listen()
        yield port


def test_address_in_use_exits_2_with_one_line(occupied_port: int) -> None:
    result = run_dot_proxy("--listen", "127.0.0.1", "--port", str(occupied_port))
    _assert_one_line_error(result, "--port: ", "already in use", str(occupied_port))


@pytest.mark.parametrize(("taken", "suggested"), [(5300, "8053"), (5353, "5300"), (53, "5300")])
def test_a_port_in_use_suggests_another_one(
    monkeypatch: pytest.MonkeyPatch, taken: int, suggested: str
) -> None:
    def in_use(address: str, port: int, kind: int, reuse_port: bool) -> socket.socket:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(sockets, "_bind_one", in_use)
    config = build_config(["--listen", "127.0.0.1"], {"DOT_PROXY_PORT": str(taken)})
    with pytest.raises(ConfigError) as raised:
        sockets.bind_sockets(config)
    message = str(raised.value)
    assert message.startswith(f"DOT_PROXY_PORT: 127.0.0.1:{taken} is already in use")
    assert message.endswith(f"e.g. DOT_PROXY_PORT={suggested}")


def test_workers_on_a_port_in_use_exit_2_with_one_line(occupied_port: int) -> None:
    # Another program's sockets have no SO_REUSEPORT: the workers cannot share its port.
    result = run_dot_proxy("--listen", "127.0.0.1", "--port", str(occupied_port), "--workers", "2")
    _assert_one_line_error(result, "already in use", str(occupied_port))


def test_udp_port_in_use_exits_2_with_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        result = run_dot_proxy("--listen", "127.0.0.1", "--port", str(port))
    _assert_one_line_error(result, "already in use")


def udp_servfail(port: int) -> None:
    """One UDP query to the proxy on ``port``, answered SERVFAIL (its upstream refuses)."""
    request = dns.message.make_query("example.com.", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(HANG_GUARD)
        client.sendto(request.to_wire(), ("127.0.0.1", port))
        answer = dns.message.from_wire(client.recv(65535))
    assert answer.id == request.id
    assert answer.rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_proxy_with_exit_0(signum: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: the upstream refuses
        upstream = f"127.0.0.1:{closed.getsockname()[1]}#dns.test"
        proxy = Proxy("--listen", "127.0.0.1", "--port", "0", "--upstream", upstream)
        try:
            port = proxy.wait_for_port()
            udp_servfail(port)  # it serves: SERVFAIL at once (the upstream refuses)
            proxy.process.send_signal(signum)
            assert proxy.finish() == 0
        finally:
            proxy.kill()
    assert not any("Traceback" in line for line in proxy.stderr), "".join(proxy.stderr)
    assert any(signal.Signals(signum).name in line for line in proxy.stderr)


def test_every_upstream_in_the_readme_examples_parses() -> None:
    # The README's examples are what users paste: each --upstream in them must be accepted,
    # and the pinned Cloudflare and Quad9 ones must carry their pins.
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    upstreams = re.findall(r"--upstream '([^']+)'", readme)
    assert len(upstreams) >= 2
    specs = [build_config(["--upstream", upstream], {}).upstreams[0] for upstream in upstreams]
    pinned = {spec.auth_name: spec.pins for spec in specs if spec.pins}
    assert pinned["cloudflare-dns.com"] == ("SPfg6FluPIlUc6a5h313BDCxQYNGX+THTy7ig5X3+VA=",)
    assert pinned["dns.quad9.net"] == ("i2kObfz0qIKCGNWt7MjBUeSrh0Dyjb0/zWINImZES+I=",)


def test_the_readme_examples_use_a_port_that_is_free_on_a_desktop() -> None:
    # 5353 is mDNS's (avahi holds it on many desktops): an example on it fails as pasted.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"(--port|-p) 5353\b", readme)
    assert "--port 5300" in readme
    # kdig opens a connection per query unless told +keepopen.
    for line in re.findall(r"kdig .*", readme):
        if line.count(" A") + line.count(" MX") > 1:
            assert "+keepopen" in line, line


def test_the_collector_is_set_up_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    # Full collections scanned every module and the config each time failing upstreams left
    # exception cycles behind (30-70 ms pauses, UDP overflow in the soak): frozen first. And
    # the youngest generation is big enough that a burst of queries in flight does not set off
    # a pass over all of them (see cli.GC_THRESHOLDS).
    when_serving: list[tuple[int, tuple[int, int, int]]] = []

    def run(_serve: object, _launch: object, sockets: list[socket.socket]) -> None:
        when_serving.append((gc.get_freeze_count(), gc.get_threshold()))
        for sock in sockets:
            sock.close()

    monkeypatch.setattr(cli.trio, "run", run)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    threshold = gc.get_threshold()
    gc.unfreeze()  # so that only main's freeze can count
    try:
        cli.main(["--listen", "127.0.0.1", "--port", "0", "--upstream", "127.0.0.1:853#dns.test"])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert len(when_serving) == 1
    frozen, thresholds = when_serving[0]
    assert frozen > 0
    assert thresholds == cli.GC_THRESHOLDS


def _running(config: Config, routes: Routes | None) -> Running:
    # What reload_on_sighup reads of a Running: its config and its resolver's routes.
    return cast(Running, SimpleNamespace(config=config, resolver=SimpleNamespace(routes=routes)))


async def test_sighup_re_reads_the_hosts_file(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\n")
    config = Config(upstreams=(parse_upstream("127.0.0.1:853#dns.test"),), hosts_file=str(hosts))
    routes = Routes(config, Target(cast(UpstreamGroup, None)))
    nursery.start_soon(reload_on_sighup, _running(config, routes), lambda old: old)
    await trio.testing.wait_all_tasks_blocked()
    with caplog.at_level(logging.INFO):
        for generation in (1, 2):
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(HANG_GUARD):
                while routes.generation < generation:  # noqa: ASYNC110 (nothing to wait on)
                    await trio.sleep(0.01)
    assert "SIGHUP: re-reading the hosts file" in caplog.text
    # No --config file: with a hosts file, SIGHUP has something to do, and says nothing else.
    assert "no --config file" not in caplog.text


async def test_sighup_without_a_hosts_or_config_file_is_logged_and_harmless(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(upstreams=(parse_upstream("127.0.0.1:853#dns.test"),))
    nursery.start_soon(reload_on_sighup, _running(config, None), lambda old: old)
    await trio.testing.wait_all_tasks_blocked()
    with caplog.at_level(logging.INFO, logger="dot_proxy"):
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(HANG_GUARD):
            while "nothing changed" not in caplog.text:  # noqa: ASYNC110
                await trio.sleep(0.01)
