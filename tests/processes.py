"""``python -m dot_proxy`` as a child process, for the tests of the command line: run it to its
end (:func:`run_dot_proxy`), or start it and read its log as it goes (:class:`Proxy`).

The child gets this environment without any ``DOT_PROXY_*`` variable (those are the test's to
set) and imports dot_proxy from this checkout.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bounds a broken run only; a healthy one takes a fraction of a second. Not a speed assertion.
HANG_GUARD = 60.0


def wait_until(condition: Callable[[], bool], what: str, *, within: float = HANG_GUARD) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it does not within ``within``
    seconds (a bound on a broken run, not a speed assertion)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        time.sleep(0.05)


def environment(**variables: str) -> dict[str, str]:
    """This process's environment minus ``DOT_PROXY_*``, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOT_PROXY_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(variables)
    return env


def run_dot_proxy(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dot_proxy ARGS`` to its end, with ``variables`` in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "dot_proxy", *args],
        cwd=ROOT,
        env=environment(**variables),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )


class Proxy:
    """``python -m dot_proxy`` as a subprocess, its stderr read line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dot_proxy", *args],
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_port(self) -> int:
        """The UDP port, read from the 'listening on' startup line."""
        while True:
            line = self.lines.get(timeout=HANG_GUARD)
            assert line is not None, "exited before listening:\n" + "".join(self.stderr)
            self.stderr.append(line)
            found = re.search(r"listening on udp 127\.0\.0\.1:(\d+)", line)
            if found:
                return int(found.group(1))

    def read_available(self) -> None:
        """Move the stderr lines read so far into ``stderr``, without waiting for more."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.stderr.append(line)

    def finish(self) -> int:
        code = self.process.wait(timeout=HANG_GUARD)
        self._reader.join(timeout=HANG_GUARD)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.stderr.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
