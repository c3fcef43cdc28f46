"""A DNS program run as a subprocess in its own temporary directory: start it (retrying with
new ports if it dies at once), wait until it answers, restart, stop and clean up.
"""

from __future__ import annotations

import abc
import contextlib
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from dot_proxy.testing.realdns.tools import STARTUP_TIMEOUT, RealDnsError


class _EarlyExitError(RealDnsError):
    """The server process exited during start-up (usually: its port was taken)."""


class _Server(abc.ABC):
    """A DNS program run as a subprocess in its own temporary directory.

    Subclasses pick their ports and write their config in ``_prepare`` (called again with
    fresh ports when a start-up attempt dies) and say in ``_probe`` what "answering" means.
    stdout and stderr go to ``log_file`` (a file, not a pipe: a pipe nobody reads fills up
    under load and stalls the server).
    """

    name: ClassVar[str]

    def __init__(self, *, workdir: Path | str | None = None, attempts: int = 3) -> None:
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix=f"realdns-{self.name}-")
            workdir = self._own_dir.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / f"{self.name}.log"
        self._attempts = attempts
        self._process: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self.returncode: int | None = None  # set by stop(): how the last process exited

    @abc.abstractmethod
    def _prepare(self) -> list[str]:
        """Choose ports, write config files; return the command line."""

    @abc.abstractmethod
    def _probe(self) -> None:
        """Raise unless the server answers one query right now."""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running process (tests may ``send_signal(SIGSTOP)`` or ``kill()`` it)."""
        if self._process is None:
            raise RealDnsError(f"{self.name} is not running")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def command(self) -> str:
        """The command line, quoted for a shell (for reports)."""
        return shlex.join(self.argv)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        """Start the process and wait until it answers.

        Error handling: an attempt whose process exits early is retried with new ports
        (``attempts`` times); a process that runs but does not answer within ``timeout`` is
        stopped and ``RealDnsError`` carries its log.
        """
        failures = []
        for _ in range(self._attempts):
            self.argv = self._prepare()
            self._spawn()
            try:
                self._wait_ready(timeout)
            except _EarlyExitError as exc:
                failures.append(str(exc))
                self.stop()
                continue
            except BaseException:
                self.stop()
                raise
            return self
        raise RealDnsError(f"{self.name} did not start:\n" + "\n".join(failures))

    def restart(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        """Stop, then start again with the same ports and config, and wait until it answers.

        For tests of a client whose server went away and came back (stale pooled
        connections). Error handling: if the port was taken meanwhile, ``RealDnsError``.
        """
        self.stop()
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        # A fresh log per attempt; a failed attempt's log is already in its error message.
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._environment(),
            )

    def _environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise _EarlyExitError(f"{self.command} exited with {code}; log:\n{self.log_text()}")
            try:
                self._probe()
            except Exception as exc:  # any failure means "not yet"; keep the last for the report
                last_error = exc
                time.sleep(0.05)
            else:
                return
        raise RealDnsError(
            f"{self.command} did not answer within {timeout} s "
            f"(last probe error: {last_error!r}); log:\n{self.log_text()}"
        )

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL) and return its exit code (also ``returncode``).

        Resource handling: SIGCONT goes first, since a test may have left it SIGSTOPped and a
        stopped process does not act on SIGTERM. The Popen is always waited for.
        """
        process, self._process = self._process, None
        code: int | None = None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
                try:
                    code = process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait()
            else:
                code = process.returncode
            self.returncode = code
        return code

    def cleanup(self) -> None:
        """Stop, and remove the temporary directory if this object made it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
