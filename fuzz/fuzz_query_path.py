"""atheris target: the whole query path, client bytes to answer bytes (``fuzz/harness.py``).

    python fuzz/fuzz_query_path.py WORK_DIR fuzz/corpus -max_total_time=60
    python fuzz/fuzz_query_path.py CRASH_FILE         # replay one input

Arguments are libFuzzer's (``-help=1`` lists them); ``fuzz/run.py`` picks sensible ones and
reports the numbers. A crash is an input for which ``QueryHandler.answer`` raised, or broke an
invariant of ``harness.check`` (``InvariantViolation``); libFuzzer saves it as ``crash-*``.
Only ``dot_proxy`` is instrumented, so ``cov:`` counts edges in the proxy's own code, not in
trio's or dnspython's.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
# libFuzzer runs this file as a script, and fuzz/ is no installed package: its harness (and,
# ahead of any installed copy, dot_proxy) come from this checkout.
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["dot_proxy"]):
    from fuzz.harness import QueryPath, TrioPump, run_input


def main(argv: list[str]) -> None:
    # The proxy logs upstream failures as warnings; thousands a second would drown libFuzzer's
    # own output and cost time. Bugs surface through ServerStats.errors, not the log.
    logging.getLogger("dot_proxy").setLevel(logging.CRITICAL)
    with TrioPump() as pump:
        path = QueryPath(pump)

        def test_one_input(data: bytes) -> None:
            run_input(path, data)

        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
