"""Finding the real DNS programs, and what a test does when one is missing.

Debian puts daemons in /usr/sbin, off an unprivileged user's PATH, so the lookup searches
there too. A test that needs a missing program is skipped, however it found out (asked with
``require_tools``, or failed to start the program in a fixture or in its body), except under
CI=true, where it fails: on CI every tool must be there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dot_proxy.testing import realdns

ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD = 120.0  # a pytest run in a subprocess; bounds a broken run only


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_a_tool_off_path_is_found_in_the_system_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbin = _executable(tmp_path / "sbin" / "fake-unbound").parent
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    # find_tool reads SYSTEM_TOOL_DIRS in realdns.tools, where it is defined.
    monkeypatch.setattr(realdns.tools, "SYSTEM_TOOL_DIRS", (str(sbin),))

    assert realdns.find_tool("fake-unbound") == str(sbin / "fake-unbound")
    assert realdns.missing_tools("fake-unbound", "fake-kdig") == ["fake-kdig"]
    # PATH comes first: a tool the user installed on it wins over the system's.
    on_path = _executable(tmp_path / "bin" / "fake-unbound")
    assert realdns.find_tool("fake-unbound") == str(on_path)


HIDE_TOOLS = """
from dot_proxy.testing import realdns

# find_tool reads SYSTEM_TOOL_DIRS in realdns.tools; with PATH empty too, nothing is found.
realdns.tools.SYSTEM_TOOL_DIRS = ()
"""

NEEDS_UNBOUND = """
import pytest

from dot_proxy.testing import realdns


@pytest.fixture
def started(tmp_path):
    with realdns.Unbound(realdns.make_pki(tmp_path), workdir=tmp_path) as server:
        yield server


def test_fixture_starts_unbound(started):
    pass


def test_body_starts_unbound(tmp_path):
    with realdns.Unbound(realdns.make_pki(tmp_path), workdir=tmp_path):
        pass


def test_asks_first(require_tools):
    require_tools("unbound")
"""


@pytest.mark.parametrize(
    ("ci", "outcome"),
    # A fixture that fails is an error of its test's setup: failed all the same.
    [("", "3 skipped in"), ("true", "2 failed, 1 error in")],
)
def test_a_missing_tool_skips_the_test_and_fails_it_on_ci(
    tmp_path: Path, ci: str, outcome: str
) -> None:
    conftest = (ROOT / "tests" / "e2e" / "conftest.py").read_text()
    (tmp_path / "conftest.py").write_text(conftest + HIDE_TOOLS)
    (tmp_path / "test_needs_unbound.py").write_text(NEEDS_UNBOUND)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env.update(PATH=str(empty), CI=ci)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsfE", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    # What is missing, in one line: no traceback of ToolMissingError.
    assert "not installed" in result.stdout, result.stdout
    assert "ToolMissingError" not in result.stdout, result.stdout
    assert shutil.which("unbound", path=str(empty)) is None
