"""The README's Options table and ``dot-proxy --help`` say the same thing, and both say what
the code does: every flag, its metavar, its variable and its default.

``--help`` is read as a user reads it (its text, printed wide enough not to wrap); the table
from the README's Options section. The defaults both show are held against the Config that no
flag, variable or file builds. (The README's config file example, every key of it:
tests/test_config_file.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dot_proxy import cli
from dot_proxy.config import DEFAULT_UPSTREAMS
from dot_proxy.core.access import DEFAULT_ALLOW

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
# Not settings: they print and exit.
NOT_SETTINGS = {"--help", "--version"}
# Switches whose Config field says the opposite of the flag.
INVERTED = {"no-padding": "padding", "no-local-zones": "local_zones"}
FIELDS = {"upstream": "upstreams", "hosts": "hosts_file", "config": "config_file"}
# How a default of "nothing" reads in the table.
NOTHING = {"none", "off", "system CAs"}


def help_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, tuple[str, str]]:
    """``--help``'s options: flag → (metavar, help text)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option's help, none wrapped
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    section = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    options: dict[str, tuple[str, str]] = {}
    current = ""
    for line in section.splitlines():
        found = re.match(r"  (?:-\w, )?(--[\w-]+)(?: (\S+))?(?:\s{2,}(.*))?$", line)
        if found:
            current = found.group(1)
            options[current] = (found.group(2) or "", found.group(3) or "")
        else:  # the help of an option whose name and metavar were too long to share a line
            metavar, help_text = options[current]
            options[current] = (metavar, f"{help_text} {line.strip()}".strip())
    return options


def readme_table() -> dict[str, tuple[str, str, str]]:
    """The Options table: flag → (metavar, variable, default), backticks and escapes kept."""
    section = README.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        flag, _, metavar = cells[0].strip("`").partition(" ")
        rows[flag] = (metavar, cells[1], cells[2])
    return rows


def code_default(option: str) -> object:
    """What the proxy uses when nothing sets ``option`` ("cache-size")."""
    config = cli.build_config([], {})
    if option == "upstream":
        return DEFAULT_UPSTREAMS
    if option in INVERTED:
        return not getattr(config, INVERTED[option])
    value = getattr(config, FIELDS.get(option, option.replace("-", "_")))
    if option == "hedge-after" and value is None:
        return "auto"
    return value


def shown(value: object) -> str:
    """A number as the docs write it: 5, not 5.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def is_nothing(value: object) -> bool:
    return value is None or value is False or value == ()


def test_every_flag_of_help_is_in_the_table_and_no_other(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = set(help_options(capsys, monkeypatch)) - NOT_SETTINGS
    assert len(flags) > 20
    assert set(readme_table()) == flags


def test_each_row_has_the_flags_metavar_and_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    options = help_options(capsys, monkeypatch)
    for flag, (metavar, variable, _) in readme_table().items():
        assert metavar == options[flag][0], flag
        assert variable == f"`DOT_PROXY_{flag[2:].upper().replace('-', '_')}`", flag


def test_the_tables_defaults_are_the_codes() -> None:
    for flag, (_, _, default) in readme_table().items():
        value = code_default(flag[2:])
        quoted = re.findall(r"`([^`]+)`", default)
        if flag == "--allow":
            # Written out in words; the networks themselves are listed under Security.
            security = README.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
            assert not quoted
            assert all(f"`{network}`" in security for network in DEFAULT_ALLOW)
        elif is_nothing(value):
            assert default in NOTHING, (flag, default)
        elif isinstance(value, tuple):
            assert quoted == [shown(item) for item in value], (flag, default)
        else:
            assert quoted[:1] == [shown(value)], (flag, default, value)


def test_the_defaults_help_gives_are_the_codes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for flag, (_, help_text) in help_options(capsys, monkeypatch).items():
        if flag in NOT_SETTINGS:
            continue
        value = code_default(flag[2:])
        stated = re.search(r"default: ([^;)]+)", help_text)
        if stated is None:
            # Named in passing ("failover (in order; default)"), or nothing to say.
            assert is_nothing(value) or re.search(
                rf"\b{re.escape(shown(value))} \([^)]*\bdefault\)", help_text
            ), (flag, help_text)
            continue
        words = stated.group(1)
        if flag == "--allow":
            assert words.startswith("loopback and private networks"), words
        elif is_nothing(value):
            assert words.split(",")[0] in {"off", "none"}, (flag, words)
        elif isinstance(value, tuple):
            hosts = [re.split(r":\d|#", item)[0] for item in value]
            assert all(host in words for host in hosts), (flag, words)
        else:
            assert re.split(r"[ ,]", words)[0].lower() == shown(value).lower(), (flag, words)
