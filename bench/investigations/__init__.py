"""One-off investigations: each answered a question about where a query's time goes, and
docs/performance.md says what it showed. Run each as a script (its docstring has the command).

``trio_floor.measure`` is meant to be imported too (``from investigations import trio_floor``
in a script of bench/), to measure the bare trio loop in the same run as the benchmark.
"""
