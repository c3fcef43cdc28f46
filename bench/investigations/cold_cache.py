"""How much slower the same Python work runs after a pause: the cost of cold caches here.

    python bench/investigations/cold_cache.py

Times a fixed workload (200 dict inserts of small tuples) back to back, then after a 5 ms pause
spent sleeping, then after one spent spinning on the clock. On a shared VM the last two are
slower alike: not the CPU idling, but other tenants using the caches meanwhile. A query at low
load runs in such a pause's aftermath; see docs/performance.md.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

REPEATS = 300
PAUSE = 0.005


def workload() -> int:
    table = {}
    for index in range(200):
        table[index] = (index, str(index))
    return len(table)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def median_us(pause: Callable[[], None] | None) -> float:
    times = []
    for _ in range(REPEATS):
        if pause is not None:
            pause()
        started = time.perf_counter()
        workload()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    print("python bench/investigations/cold_cache.py  (median of 300, µs)")
    print(f"back to back:          {median_us(None):7.1f}")
    print(f"after a 5 ms sleep:    {median_us(lambda: time.sleep(PAUSE)):7.1f}")
    print(f"after a 5 ms spin:     {median_us(lambda: spin(PAUSE)):7.1f}")


if __name__ == "__main__":
    main()
