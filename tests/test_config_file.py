"""The config file (--config FILE, TOML): parsing, precedence, every error, check-config.

Precedence is flag, then DOT_PROXY_* variable, then the file, then the default; a list given
by a flag or variable replaces the file's. Every error is one line naming the file and key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dot_proxy import cli
from dot_proxy.cli import build_config, check_config_file
from dot_proxy.config import Config, UpstreamSpec
from dot_proxy.config_file import SHAPES, ConfigFile
from dot_proxy.errors import ConfigError
from dot_proxy.reloading import RESTART_ONLY, plan_reload
from tests.processes import run_dot_proxy

EVERY_KEY = """\
listen = ["127.0.0.1", "::1"]
port = 5300
upstream = ["9.9.9.9#dns.quad9.net", "149.112.112.112#dns.quad9.net"]
timeout = 3
log-level = "warning"
log-format = "json"
tcp-idle-timeout = 5.5
max-connections = 2
max-pipeline = 64
upstream-idle-timeout = 20
max-in-flight = 1000
allow = ["10.0.0.0/8", "192.168.1.0/24"]
max-tcp-clients = 100
ratelimit = 50
user = "nobody"
no-padding = true
upstream-policy = "round-robin"
workers = 2
cache-size = 20000
cache-min-ttl = 10
cache-max-ttl = 3600
serve-stale = 0
hedge-after = "off"
metrics = "127.0.0.1:9153"
"""


def write(tmp_path: Path, text: str, name: str = "dot-proxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_flag_has_a_key_and_every_key_a_flag() -> None:
    options = {
        action.option_strings[0][2:]
        for action in cli._parser()._actions
        if action.option_strings and action.option_strings[0].startswith("--")
    }
    assert set(SHAPES) == options - {"config", "version", "help"}


def test_a_file_with_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, EVERY_KEY)
    config = build_config(["--config", path], {})
    assert config.listen == ("127.0.0.1", "::1")
    assert config.port == 5300
    assert config.upstreams[0] == UpstreamSpec("9.9.9.9", 853, "dns.quad9.net")
    assert config.timeout == 3.0
    assert config.log_level == "WARNING"
    assert config.log_format == "json"
    assert config.tcp_idle_timeout == 5.5
    assert (config.max_connections, config.max_pipeline) == (2, 64)
    assert config.upstream_idle_timeout == 20.0
    assert (config.max_in_flight, config.max_tcp_clients) == (1000, 100)
    assert config.allow == ("10.0.0.0/8", "192.168.1.0/24")
    assert config.ratelimit == 50.0
    assert config.user == "nobody"
    assert config.padding is False
    assert config.upstream_policy == "round-robin"
    assert config.workers == 2
    assert (config.cache_size, config.cache_min_ttl, config.cache_max_ttl) == (20000, 10, 3600)
    assert config.serve_stale == 0.0
    assert config.hedge_after == 0.0
    assert config.metrics == ("127.0.0.1", 9153)
    assert config.config_file == path
    assert config.name_of("port") == f"{path}: port"


def test_the_readme_example_is_a_valid_file(tmp_path: Path, ca_file: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    # The system's CA bundle may not be there; the test's is.
    example = example.replace("/etc/ssl/certs/ca-certificates.crt", ca_file)
    config = build_config(["--config", write(tmp_path, example)], {})
    assert set(ConfigFile.load(str(tmp_path / "dot-proxy.toml")).values) == set(SHAPES)
    assert config.metrics is not None


def test_flag_beats_variable_beats_file_beats_default(tmp_path: Path) -> None:
    path = write(tmp_path, "timeout = 3\nport = 5301\ncache-size = 7\n")
    env = {"DOT_PROXY_TIMEOUT": "4", "DOT_PROXY_PORT": "5302"}
    config = build_config(["--config", path, "--timeout", "2"], env)
    assert config.timeout == 2.0  # flag
    assert config.port == 5302  # variable
    assert config.cache_size == 7  # file
    assert config.max_pipeline == 128  # default
    assert config.name_of("timeout") == "--timeout"
    assert config.name_of("port") == "DOT_PROXY_PORT"
    assert config.name_of("cache-size") == f"{path}: cache-size"


def test_a_list_from_a_flag_or_variable_replaces_the_files(tmp_path: Path) -> None:
    path = write(tmp_path, 'allow = ["10.0.0.0/8", "172.16.0.0/12"]\nlisten = ["127.0.0.1"]\n')
    config = build_config(["--config", path, "--allow", "192.168.0.0/16"], {})
    assert config.allow == ("192.168.0.0/16",)
    assert config.listen == ("127.0.0.1",)
    config = build_config(["--config", path], {"DOT_PROXY_LISTEN": "::1"})
    assert config.listen == ("::1",)
    assert config.allow == ("10.0.0.0/8", "172.16.0.0/12")


def test_the_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 5303\n")
    assert build_config([], {"DOT_PROXY_CONFIG": path}).port == 5303


ERRORS = [
    # file text, the error after "FILE: "
    ("timout = 3\n", "unknown key 'timout' (did you mean 'timeout'?)"),
    ("[upstream]\nhost = '1.1.1.1'\n", "upstream: expected a list of strings, got a table"),
    ("[server]\nport = 53\n", "unknown key 'server'; settings are top-level keys, not tables"),
    ("port = '53'\n", "port: expected an integer, got a string"),
    ("port = 53.0\n", "port: expected an integer, got a float"),
    ("port = true\n", "port: expected an integer, got a boolean"),
    ("timeout = '5'\n", "timeout: expected a number, got a string"),
    ("upstream = '9.9.9.9'\n", "upstream: expected a list of strings, got a string"),
    ("upstream = [1, 2]\n", "upstream: expected a list of strings, got a list of non-strings"),
    ("no-padding = 1\n", "no-padding: expected true or false, got an integer"),
    ("log-level = 10\n", "log-level: expected a string, got an integer"),
    ("workers = 1.5\n", 'workers: expected an integer or "auto", got a float'),
    ("hedge-after = true\n", 'hedge-after: expected a number, "auto" or "off", got a boolean'),
    ("user = 1970-01-01\n", "user: expected a string, got a date"),
    ("port = 70000\n", "port: 70000 is out of range (0 to 65535)"),
    ("timeout = -1\n", "timeout: -1 must be a positive number of seconds"),
    ("log-level = 'loud'\n", "log-level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"),
    ("log-format = 'xml'\n", "log-format: 'xml' is not one of text, json"),
    ("workers = 'many'\n", "workers: 'many' is not a valid value"),
    ("upstream = ['dns.google']\n", "upstream: 'dns.google': 'dns.google' is not an IP address"),
    ("allow = ['10.0.0.1/8']\n", "allow: '10.0.0.1/8' has host bits set"),
    ("metrics = '9153'\n", "metrics: '9153' is not ADDR:PORT"),
    ("metrics = 'localhost:9153'\n", "metrics: 'localhost' is not an IP address"),
    ("upstream = []\n", "upstream: at least one upstream is needed"),
    ("port = \n", "not valid TOML: Invalid value (at line 1, column 8)"),
    ("hedge-after = 9\n", "hedge-after: 9 must be less than the query timeout"),
]


@pytest.mark.parametrize(("text", "error"), ERRORS, ids=[e for _, e in ERRORS])
def test_every_error_names_the_file_and_key_in_one_line(
    tmp_path: Path, text: str, error: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        build_config(["--config", path], {})
    message = str(raised.value)
    assert message.startswith(f"{path}: {error}")
    assert "\n" not in message


def test_a_relation_names_each_key_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "timeout = 1\nhedge-after = 2\n")
    with pytest.raises(ConfigError) as raised:
        build_config(["--config", path], {})
    assert str(raised.value) == (
        f"{path}: hedge-after: 2 must be less than the query timeout (1 s, {path}: timeout), "
        "or 0 (off)"
    )


def test_a_bad_key_stops_the_start_even_where_a_flag_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 70000\n")
    with pytest.raises(ConfigError, match=r": port: 70000 is out of range"):
        build_config(["--config", path, "--port", "5300"], {})


def test_a_missing_file_names_where_its_path_came_from(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as raised:
        build_config(["--config", missing], {})
    assert str(raised.value) == f"--config: {missing!r} does not exist"
    with pytest.raises(ConfigError) as raised:
        build_config([], {"DOT_PROXY_CONFIG": missing})
    assert str(raised.value) == f"DOT_PROXY_CONFIG: {missing!r} does not exist"
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        build_config(["--config", str(tmp_path)], {})


def test_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"port = \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary\.toml: not valid TOML"):
        build_config(["--config", str(path)], {})


def test_check_config_file_reads_the_file_alone(tmp_path: Path) -> None:
    config = check_config_file(write(tmp_path, "port = 5300\n"))
    assert isinstance(config, Config)
    assert config.port == 5300


def test_check_config_exits_0_for_a_good_file_and_2_for_a_bad_one(tmp_path: Path) -> None:
    good = run_dot_proxy("check-config", write(tmp_path, EVERY_KEY))
    assert good.returncode == 0, good.stderr
    assert "ok (24 settings; 2 upstream(s))" in good.stdout
    bad_path = write(tmp_path, "port = 'x'\n", name="bad.toml")
    bad = run_dot_proxy("check-config", bad_path)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"dot-proxy check-config: {bad_path}: port: expected an integer, got a string"
    ]
    usage = run_dot_proxy("check-config")
    assert usage.returncode == 2
    assert "usage: dot-proxy check-config FILE" in usage.stderr


def test_the_proxy_with_a_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cache-size = -5\n")
    result = run_dot_proxy("--config", path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"dot-proxy: {path}: cache-size: -5 is out of range (0 to 10000000)"
    ]


# --- What a reload may change ------------------------------------------------------------------


def test_a_reload_keeps_the_settings_that_need_a_restart(tmp_path: Path) -> None:
    old = build_config(["--config", write(tmp_path, "port = 5300\ntimeout = 5\n")], {})
    new = build_config(["--config", write(tmp_path, "port = 5301\ntimeout = 2\n")], {})
    applied, restart, changed = plan_reload(old, new)
    assert applied.port == 5300
    assert applied.timeout == 2.0
    assert restart == ["port"]
    assert changed == ["timeout"]


def test_restart_only_settings_are_config_fields() -> None:
    fields = set(Config.__dataclass_fields__)
    assert set(RESTART_ONLY) <= fields
    assert {"listen", "port", "workers", "user"} <= set(RESTART_ONLY.values())
