"""What TLS session resumption saves when dot-proxy reconnects to an upstream.

    python bench/tls_resumption.py [--rounds 200] [--tls12]

Starts unbound serving DoT on loopback (dot_proxy.testing.realdns, a trustme certificate) and
opens connections to it with dot-proxy's own ``open_tls``: alternately a full handshake and one
that resumes the previous connection's session (``TLSSessions``). Each connection asks one
query before it closes, so a TLS 1.3 client holds its ticket. Prints, per kind, the median and
90th percentile of the wall time of ``open_tls`` (TCP connect, handshake, pin check) and of this
process's CPU time in it, and what CPython's copy of a session (read from the last stream, set
on the new one) costs in CPU by itself. Loopback has no round-trip time: on a real path, add one
RTT to a TLS 1.2 full handshake (TLS 1.3 and TLS 1.2 resumption take one, TLS 1.2 in full two).
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import dns.message
import trio

from dot_proxy.config import UpstreamSpec, parse_upstream
from dot_proxy.core.framing import NEED_DATA, FrameDecoder, frame
from dot_proxy.testing.realdns import Unbound, Zone, make_pki
from dot_proxy.upstream.tls import TLSSessions, make_ssl_context, open_tls

Sample = tuple[float, float]  # wall seconds, CPU seconds of this process
COPY_REPEATS = 200


async def one_connection(
    spec: UpstreamSpec, context: ssl.SSLContext, sessions: TLSSessions | None, query: bytes
) -> tuple[Sample, bool]:
    wall, cpu = time.perf_counter(), time.process_time()
    stream = await open_tls(spec, context, sessions)
    sample = (time.perf_counter() - wall, time.process_time() - cpu)
    reused = bool(stream.session_reused)
    try:
        await exchange(stream, query)
    finally:
        await stream.aclose()
    return sample, reused


async def exchange(stream: trio.SSLStream[Any], query: bytes) -> None:
    await stream.send_all(frame(query))
    decoder = FrameDecoder()
    while decoder.next_message() is NEED_DATA:
        decoder.feed(await stream.receive_some(65536))


def session_copy_cpu(stream: trio.SSLStream[Any], context: ssl.SSLContext) -> float:
    """CPU seconds to read a stream's session and set it on a new SSL object: CPython copies
    the session through DER both ways (a workaround for OpenSSL issue 1550)."""
    started = time.process_time()
    for _ in range(COPY_REPEATS):
        session = stream.session
        fresh = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x.test")
        fresh.session = session
    return (time.process_time() - started) / COPY_REPEATS


async def measure(
    spec: UpstreamSpec, context: ssl.SSLContext, rounds: int, query: bytes
) -> tuple[dict[str, list[Sample]], float]:
    samples: dict[str, list[Sample]] = {"full": [], "resumed": []}
    sessions = TLSSessions()
    # A first connection gives the store something to resume, and warms both ends.
    await one_connection(spec, context, sessions, query)
    kinds: list[tuple[str, Callable[[], Awaitable[tuple[Sample, bool]]]]] = [
        ("full", lambda: one_connection(spec, context, None, query)),
        ("resumed", lambda: one_connection(spec, context, sessions, query)),
    ]
    for _ in range(rounds):
        for kind, connect in kinds:  # interleaved: drift on a shared host hits both alike
            sample, reused = await connect()
            if reused != (kind == "resumed"):
                raise SystemExit(f"a {kind} handshake came out reused={reused}")
            samples[kind].append(sample)
    stream = await open_tls(spec, context, None)
    try:
        await exchange(stream, query)
        copy = session_copy_cpu(stream, context)
    finally:
        await stream.aclose()
    return samples, copy


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(len(ordered) * 0.9)]
    return f"median {statistics.median(ordered) * 1e6:7.0f} µs  p90 {p90 * 1e6:7.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tls12", action="store_true", help="cap the client at TLS 1.2")
    args = parser.parse_args()
    command = "python bench/tls_resumption.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as workdir:
        pki = make_pki(f"{workdir}/pki")
        zone = Zone()
        with Unbound(pki, zone, workdir=f"{workdir}/unbound") as unbound:
            unbound.start()
            spec = parse_upstream(unbound.upstream_spec)
            context = make_ssl_context(ca_file=str(pki.ca_file))
            if args.tls12:
                context.maximum_version = ssl.TLSVersion.TLSv1_2
            query = dns.message.make_query(zone.host(0), "A").to_wire()
            samples, copy = trio.run(measure, spec, context, args.rounds, query)
    version = "TLS 1.2" if args.tls12 else "TLS 1.3"
    print(f"{command.strip()}  ({version}, unbound on loopback, {args.rounds} of each)")
    for kind in ("full", "resumed"):
        walls = [wall for wall, _ in samples[kind]]
        cpus = [cpu for _, cpu in samples[kind]]
        print(f"{kind:8} wall {summary(walls)}   client CPU {summary(cpus)}")
    ratio = statistics.median(w for w, _ in samples["resumed"]) / statistics.median(
        w for w, _ in samples["full"]
    )
    print(f"resumed / full, median wall: {ratio:.2f}")
    print(f"of which CPython's session copy (get + set), CPU: {copy * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
