"""dot-proxy in this process against a local unbound, driven by dnsperf: for tools that look
inside the process while it serves (``investigations/rounds.py``, ``investigations/gc_passes.py``).

dot_proxy is imported when :func:`run_under_dnsperf` is called, not before, so that a tool may
first put another checkout on ``sys.path`` and measure that one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dot_proxy.testing import realdns


def run_under_dnsperf(
    *,
    transport: realdns.DnsperfMode,
    clients: int,
    seconds: float,
    during: Callable[[], AbstractContextManager[object]],
    qps: int | None = None,
) -> realdns.DnsperfResult:
    """Serve (default configuration, one upstream), warm up for 1 s, then run dnsperf for
    ``seconds`` inside ``during()``; its result."""
    import trio  # noqa: PLC0415

    from dot_proxy.config import Config, parse_upstream  # noqa: PLC0415
    from dot_proxy.handler import ServerStats  # noqa: PLC0415
    from dot_proxy.serve.server import serve  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="dot-proxy-inprocess-") as temporary:
        work = Path(temporary)
        pki = realdns.make_pki(work / "pki")
        queries = realdns.write_queries(work / "queries.txt")
        with realdns.Unbound(pki, workdir=work / "unbound") as unbound:
            config = Config(
                upstreams=(parse_upstream(unbound.upstream_spec),),
                listen=("127.0.0.1",),
                port=0,
                ca_file=str(pki.ca_file),
            )
            results: list[realdns.DnsperfResult] = []

            def dnsperf(port: int, length: float) -> realdns.DnsperfResult:
                return realdns.run_dnsperf(
                    port, queries, mode=transport, clients=clients, seconds=length, max_qps=qps
                )

            async def run() -> None:
                stop = trio.Event()

                async def serving(task_status: trio.TaskStatus[Any]) -> None:
                    await serve(config, stop=stop, stats=ServerStats(), task_status=task_status)

                async with trio.open_nursery() as nursery:
                    port = (await nursery.start(serving))[0][2]
                    await trio.to_thread.run_sync(dnsperf, port, 1.0)  # warm-up: the handshake
                    with during():
                        results.append(await trio.to_thread.run_sync(dnsperf, port, seconds))
                    stop.set()

            trio.run(run)
    return results[0]
