"""What the design's fixed shape costs per query in trio alone, before any TLS or DNS work.

    python bench/investigations/trio_floor.py --seconds 8 --rounds 3 --out docs/trio-floor.md

The design card fixes the shape of the hot path: a trio serve loop that spawns a task per
query, each task under ``trio.move_on_after(timeout)``, talking to a connection whose reader and
writer are tasks of their own. This bench runs that shape with every real part taken out: a
UDP responder on loopback that answers each query by flipping it into an empty NXDOMAIN, the
"upstream" being a hand-off through one writer task and back. dnsperf (20 clients) drives it;
each row is a shape, cumulative, and reports the responder's CPU time per answered query
(utime + stime / answers), the steadiest figure on a shared machine. The rows are measured in
rounds, interleaved, and the median is printed.

- bare: read a burst, answer each datagram inline: the syscalls and a Python loop;
- task: and a task spawned per query that sends the answer;
- scope: and the task runs under move_on_after(5);
- handoff: and the task queues its query for a writer task and parks until it is woken, as a
  query waits for its upstream answer (two task switches, no I/O).

Compare the last row with stubby's whole per-query cost in docs/benchmarks.md. ``--qps N``
caps dnsperf's rate instead: below saturation the responder sleeps and wakes between
datagrams, and on this kind of VM each wake-up costs far more CPU than the work it wakes for.
``--burst N`` sets how many datagrams one wake-up takes at most (64 here; the proxy's UDP loop
takes 256). ``bench/run_bench.py`` runs the bare shape as a row of its own (``responder``), the
ceiling of a cache hit answered in the serve loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.rcode
import trio

from dot_proxy.testing import realdns

SHAPES = ("bare", "task", "scope", "handoff")
BURST = 64
STARTUP_TIMEOUT = 10.0


def _nxdomain(query: bytes) -> bytes:
    # QR=1, RA=1, RCODE=3, counts as the query's: the question echoed back.
    return query[:2] + bytes([query[2] | 0x80, 0x83]) + query[4:]


async def _serve(sock: socket.socket, shape: str, burst: int) -> None:
    lot = trio.lowlevel.ParkingLot()
    queue: list[trio.lowlevel.ParkingLot] = []

    async def writer() -> None:
        # Stands for the upstream connection: wakes each waiting query in the next round.
        while True:
            if not queue:
                await lot.park()
            waiting = queue[:]
            queue.clear()
            await trio.lowlevel.checkpoint()
            for parked in waiting:
                parked.unpark()

    async def answer(data: bytes, address: tuple[str, int]) -> None:
        if shape == "task":
            sock.sendto(_nxdomain(data), address)
            return
        with trio.move_on_after(5):
            if shape == "handoff":
                parked = trio.lowlevel.ParkingLot()
                queue.append(parked)
                if len(queue) == 1:
                    lot.unpark()
                await parked.park()
            sock.sendto(_nxdomain(data), address)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(burst):
                try:
                    data, address = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if shape == "bare":
                    sock.sendto(_nxdomain(data), address)
                else:
                    nursery.start_soon(answer, data, address)


def serve_forever(port: int, shape: str, burst: int) -> None:
    """Run one responder in this process until killed (the child's entry point)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # as the proxy's
    sock.bind((realdns.LOOPBACK, port))
    sock.setblocking(False)
    trio.run(_serve, sock, shape, burst)


@dataclass(frozen=True, slots=True)
class Responder:
    """A responder running in a child process: where it listens (UDP), its pid, how it ran."""

    port: int
    pid: int
    command: str


@contextlib.contextmanager
def responder(shape: str, *, burst: int = BURST) -> Iterator[Responder]:
    """A responder of ``shape`` in a child process on a loopback port, answering when this
    yields; killed on exit.

    Error handling: ``realdns.RealDnsError`` if it exits or does not answer within
    ``STARTUP_TIMEOUT`` seconds.
    """
    port = realdns.free_port("udp")
    argv = [sys.executable, __file__, "--child", shape, str(port), "--burst", str(burst)]
    child = subprocess.Popen(argv)
    try:
        _wait_answering(child, port)
        yield Responder(port, child.pid, shlex.join(argv))
    finally:
        child.kill()
        child.wait()


def _wait_answering(child: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise realdns.RealDnsError(f"trio_floor responder exited with {child.returncode}")
        try:
            answer = realdns.udp_query(port, "h0.test.", timeout=0.2)
        except (dns.exception.Timeout, OSError):
            continue
        if answer.rcode() == dns.rcode.NXDOMAIN:
            return
    raise realdns.RealDnsError(f"trio_floor responder did not answer on port {port}")


def measure(shape: str, queries: Path, seconds: float, qps: int | None, burst: int) -> float:
    """CPU µs per answered query of one responder of ``shape`` under dnsperf."""
    with responder(shape, burst=burst) as child:
        realdns.run_dnsperf(child.port, queries, mode="udp", seconds=1)  # warm up
        before = realdns.cpu_seconds(child.pid)
        result = realdns.run_dnsperf(child.port, queries, mode="udp", seconds=seconds, max_qps=qps)
        used = realdns.cpu_seconds(child.pid) - before
        return used / max(result.queries_completed, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--qps", type=int, help="cap dnsperf's rate (default: maximum)")
    parser.add_argument(
        "--burst", type=int, default=BURST, help=f"datagrams per wake-up (default: {BURST})"
    )
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_forever(int(args.child[1]), args.child[0], args.burst)
        return
    load = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="trio-floor-"))
    queries = realdns.write_queries(workdir / "queries.txt", realdns.Zone())
    results: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    for _ in range(args.rounds):
        for shape in SHAPES:
            results[shape].append(measure(shape, queries, args.seconds, args.qps, args.burst))
    command = "python bench/investigations/trio_floor.py"
    command += f" --seconds {args.seconds:g} --rounds {args.rounds}"
    if args.qps:
        command += f" --qps {args.qps}"
    if args.burst != BURST:
        command += f" --burst {args.burst}"
    if args.out:
        command += f" --out {args.out}"
    rate = f"at most {args.qps} q/s" if args.qps else "maximum rate"
    lines = [
        f"$ {command}",
        f"(load average before: {load:.2f}; dnsperf 20 clients, UDP, {rate})",
        "",
        "| shape | CPU µs per query (median) | rounds |",
        "|---|---|---|",
    ]
    for shape in SHAPES:
        rounds = ", ".join(f"{value:.1f}" for value in results[shape])
        lines.append(f"| {shape} | {statistics.median(results[shape]):.1f} | {rounds} |")
    print("\n".join(lines))
    if args.out:
        doc = (__doc__ or "").split("\n\n", 2)[2].strip()
        args.out.write_text(
            "# The design's floor in trio\n\n"
            + doc
            + "\n\n```\n"
            + "\n".join(lines[:2])
            + "\n```\n\n"
            + "\n".join(lines[3:])
            + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
