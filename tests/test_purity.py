"""The pure modules stay pure: importing them pulls in neither trio nor the I/O shell.

Run in a fresh interpreter, because this test process has long since imported trio (conftest).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = ", ".join(
    f"dot_proxy.{name}" for name in ("wire", "config", "errors", "edns", "pins", "health")
)


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_pure_modules_do_not_import_trio() -> None:
    result = run(f"import {PURE}, sys; assert 'trio' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_pure_modules_do_not_import_the_shell() -> None:
    # Imports run downhill only: cli → server → resolver → upstream → wire.
    shell = ["cli", "server", "resolver", "upstream", "streams"]
    result = run(
        f"import {PURE}, sys\n"
        f"loaded = [m for m in {shell!r} if 'dot_proxy.' + m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    assert result.returncode == 0, result.stderr
