"""The benchmark's chart: throughput at maximum load and latency at low load, one bar a row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from report import Row

TRANSPORT_COLOURS = {"udp": "tab:blue", "tcp": "tab:orange", "dot": "tab:gray"}


def write_chart(rows: Sequence[Row], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (optional: only needed for the chart)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    # "dot-proxy-no-padding" is too wide for its bar: put the variant on a line of its own.
    labels = [f"{_wrapped(row.target)}\n{row.transport}" for row in rows]
    positions = range(len(rows))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 1.1), 8))
    top.bar(
        positions,
        [row.qps for row in rows],
        yerr=[
            [row.qps - row.qps_min for row in rows],
            [row.qps_max - row.qps for row in rows],
        ],
        capsize=3,
        color=[TRANSPORT_COLOURS.get(row.transport, "tab:gray") for row in rows],
    )
    top.legend(
        handles=[Patch(color=colour, label=name) for name, colour in TRANSPORT_COLOURS.items()]
    )
    top.set_ylabel("queries/s (median, min-max)")
    top.set_title("Throughput at maximum load")
    width = 0.4
    p50 = [row.p50 * 1e3 for row in rows]
    p99 = [row.p99 * 1e3 for row in rows]
    bottom.bar([p - width / 2 for p in positions], p50, width, label="p50", color="tab:green")
    bottom.bar([p + width / 2 for p in positions], p99, width, label="p99", color="tab:red")
    bottom.set_ylabel("ms")
    bottom.set_title("Latency at low load")
    bottom.legend()
    for axes in (top, bottom):
        axes.set_xticks(list(positions), labels, fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _wrapped(name: str) -> str:
    return name.replace("dot-proxy-", "dot-proxy\n", 1)
