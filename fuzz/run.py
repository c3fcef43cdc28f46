"""Fuzz the query path for a set time and report executions and coverage.

    python fuzz/run.py --seconds 60                 # what `nox -s fuzz` runs
    python fuzz/run.py --seconds 600 --fresh -- -seed=1

Runs ``fuzz/fuzz_query_path.py`` (atheris, libFuzzer) over the committed seeds in
``fuzz/corpus/`` and past crashes in ``fuzz/regressions/``, plus a working corpus it grows in
``fuzz/work/`` (not committed), with the DNS dictionary ``fuzz/dns.dict``. libFuzzer's output
goes to the terminal and to ``fuzz/last-run.log``; at the end its final statistics are
summarised: executions, executions per second, coverage (``cov``: instrumented edges of
``dot_proxy`` reached; ``ft``: features) and corpus size. Crashing inputs land in
``fuzz/crashes/``; the exit status is libFuzzer's (non-zero on a crash). Arguments after
``--`` go to libFuzzer.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "fuzz_query_path.py"
# libFuzzer's status line, e.g. "#21204  DONE   cov: 520 ft: 1335 corp: 100/4206b ... exec/s: 1009"
_STATUS = re.compile(
    r"^#(?P<execs>\d+)\s+(?P<event>\w+)\s+cov: (?P<cov>\d+) ft: (?P<ft>\d+) "
    r"corp: (?P<units>\d+)/(?P<size>\d+\w*).*?exec/s: (?P<rate>\d+)"
)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")


@dataclass(frozen=True, slots=True)
class Summary:
    """The last status line and final statistics of a libFuzzer run."""

    executions: int
    execs_per_second: int
    coverage: int  # edges in instrumented code (dot_proxy only)
    features: int
    corpus_units: int
    corpus_size: str
    new_units: int
    crashes: tuple[Path, ...]

    def lines(self) -> list[str]:
        crashes = ", ".join(str(path) for path in self.crashes) or "none"
        return [
            f"executions:      {self.executions:,} ({self.execs_per_second:,}/s)",
            f"coverage:        cov {self.coverage} edges, ft {self.features} features",
            f"corpus:          {self.corpus_units} inputs, {self.corpus_size} "
            f"({self.new_units} new this run)",
            f"crashes:         {crashes}",
        ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="working corpus")
    parser.add_argument("--crashes", type=Path, default=HERE / "crashes", help="crash inputs")
    parser.add_argument("--log", type=Path, default=HERE / "last-run.log", help="full output")
    parser.add_argument("--max-len", type=int, default=2048, help="longest input (bytes)")
    parser.add_argument("--fresh", action="store_true", help="empty the working corpus first")
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags (after --)")
    return parser.parse_args(argv)


def command(args: argparse.Namespace) -> list[str]:
    """The libFuzzer command line: working corpus first (new inputs go there), seeds second."""
    return [
        sys.executable,
        str(TARGET),
        str(args.work),
        str(HERE / "corpus"),
        str(HERE / "regressions"),  # inputs that once crashed it: keep them in the mix
        f"-max_total_time={args.seconds}",
        f"-max_len={args.max_len}",
        f"-dict={HERE / 'dns.dict'}",
        f"-artifact_prefix={args.crashes}/",
        # A single input runs in milliseconds; a second-long one is a hang worth a report.
        "-timeout=10",
        "-print_final_stats=1",
        *args.libfuzzer,
    ]


def run(argv: list[str], log: Path) -> tuple[int, list[str]]:
    """Run libFuzzer, echoing and logging its output; its exit code and output lines."""
    lines: list[str] = []
    with (
        log.open("w") as log_file,
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as process,
    ):
        assert process.stdout is not None
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log_file.write(line)
                lines.append(line.rstrip("\n"))
        except KeyboardInterrupt:
            process.terminate()  # libFuzzer prints its final stats on SIGTERM too
            raise
    return process.returncode, lines


def summarize(lines: Sequence[str], crashes: Sequence[Path]) -> Summary | None:
    """The numbers from libFuzzer's output, or None if it never got going."""
    status = None
    for line in lines:
        if match := _STATUS.match(line):
            status = match
    if status is None:
        return None
    stats = {m.group(1): int(m.group(2)) for line in lines if (m := _STAT.match(line))}
    return Summary(
        executions=stats.get("number_of_executed_units", int(status["execs"])),
        execs_per_second=stats.get("average_exec_per_sec", int(status["rate"])),
        coverage=int(status["cov"]),
        features=int(status["ft"]),
        corpus_units=int(status["units"]),
        corpus_size=status["size"],
        new_units=stats.get("new_units_added", 0),
        crashes=tuple(crashes),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    args.crashes.mkdir(parents=True, exist_ok=True)
    before = set(args.crashes.iterdir())
    argv_ = command(args)
    print("$ " + " ".join(argv_), flush=True)
    code, lines = run(argv_, args.log)
    crashes = sorted(set(args.crashes.iterdir()) - before)
    summary = summarize(lines, crashes)
    print("\n== fuzz summary ==")
    if summary is None:
        print(f"libFuzzer printed no status line (exit {code}); see {args.log}")
        return code or 1
    print("\n".join(summary.lines()))
    if crashes:
        print("replay one with: python fuzz/fuzz_query_path.py CRASH_FILE")
    return code


if __name__ == "__main__":
    sys.exit(main())
