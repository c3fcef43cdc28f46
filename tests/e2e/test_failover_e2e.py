"""End to end: one upstream dies under load, and no client notices more than a blip.

Two real unbound instances serve the test zone over DoT; ``python -m dot_proxy`` forwards to
them in failover order; dnsperf loads the proxy over UDP. Two seconds in, the first unbound is
frozen (SIGSTOP: it accepts nothing, answers nothing, closes nothing, the worst kind of dead),
and a second later killed (SIGKILL: its connections reset, its port refuses). Every query must
still be answered (dnsperf loses none), and the survivor must take the traffic within a
second: a probe client that asks every 20 ms sees answers again within a second of the stop,
and the survivor's query log shows the load arriving there.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.rcode
import pytest

from dot_proxy.testing import realdns

pytestmark = pytest.mark.e2e

RUN_SECONDS = 6.0
STOP_AFTER = 2.0  # seconds into the run
KILL_AFTER = 1.0  # seconds after the stop
PROXY_TIMEOUT = 5.0  # dot-proxy's default deadline: a query it cannot answer gets SERVFAIL then
# Physical time on a busy machine: what "within a second" and "promptly" are allowed to be.
FAILOVER_WITHIN = 1.0
PROMPT = 0.5
PROBE_EVERY = 0.02

# unbound with log-queries: "[1700000000] unbound[123:0] info: 127.0.0.1 h7.test. A IN"
_QUERY_LINE = re.compile(r"info: \S+ (\S+) \S+ IN$", re.MULTILINE)


def queries_seen(server: realdns.Unbound) -> int:
    """How many queries for the test zone ``server`` has logged (the proxy's probes, for
    ``.``, not counted)."""
    return sum(1 for name in _QUERY_LINE.findall(server.log_text()) if name.endswith("test."))


@dataclass(frozen=True)
class Probe:
    sent: float  # time.monotonic()
    latency: float | None  # None: no answer within the probe's timeout
    rcode: int | None


def probe_until(port: int, done: threading.Event, probes: list[Probe]) -> None:
    """Ask the proxy one query every PROBE_EVERY seconds until ``done``; record each."""
    zone = realdns.Zone()
    index = 0
    while not done.is_set():
        sent = time.monotonic()
        try:
            answer = realdns.udp_query(
                port, zone.host(index % zone.hosts), timeout=PROXY_TIMEOUT + 2
            )
        except dns.exception.Timeout:
            probes.append(Probe(sent, None, None))
        else:
            probes.append(Probe(sent, time.monotonic() - sent, answer.rcode()))
        index += 1
        done.wait(max(0.0, sent + PROBE_EVERY - time.monotonic()))


def test_the_survivor_takes_over_when_the_first_unbound_stops_under_load(
    pki: realdns.Pki, tmp_path: Path, require_tools: Callable[..., None]
) -> None:
    require_tools("unbound", "dnsperf")
    log_queries = ["log-queries: yes"]
    with (
        realdns.Unbound(pki, workdir=tmp_path / "first", extra_config=log_queries) as first,
        realdns.Unbound(pki, workdir=tmp_path / "second", extra_config=log_queries) as second,
        realdns.DotProxy(
            pki,
            [first.upstream_spec, second.upstream_spec],
            extra_args=["--upstream-policy", "failover"],
            workdir=tmp_path / "proxy",
        ) as proxy,
    ):
        queries = realdns.write_queries(tmp_path / "queries.txt", count=5000)
        outcome: dict[str, object] = {}

        def load() -> None:
            try:
                outcome["result"] = realdns.run_dnsperf(
                    proxy.port,
                    queries,
                    mode="udp",
                    clients=5,
                    seconds=RUN_SECONDS,
                    max_qps=1000,
                    # Above the proxy's deadline: a query the proxy gave up on comes back as
                    # SERVFAIL, so "lost" means the proxy dropped it.
                    timeout=PROXY_TIMEOUT + 2,
                )
            except BaseException as exc:  # reported by the test thread below
                outcome["error"] = exc

        probes: list[Probe] = []
        done = threading.Event()
        loader = threading.Thread(target=load, name="dnsperf")
        prober = threading.Thread(target=probe_until, args=(proxy.port, done, probes))
        loader.start()
        prober.start()
        try:
            time.sleep(STOP_AFTER)
            first_before, second_before = queries_seen(first), queries_seen(second)
            stopped_at = time.monotonic()
            first.process.send_signal(signal.SIGSTOP)
            time.sleep(FAILOVER_WITHIN)
            second_at_one_second = queries_seen(second)
            first.process.send_signal(signal.SIGKILL)
            loader.join(timeout=RUN_SECONDS + PROXY_TIMEOUT + 40)
        finally:
            done.set()
            prober.join(timeout=PROXY_TIMEOUT + 5)
        assert not loader.is_alive(), "dnsperf did not finish"
        error = outcome.get("error")
        if isinstance(error, BaseException):
            raise AssertionError("dnsperf failed") from error
        result = outcome["result"]
        assert isinstance(result, realdns.DnsperfResult)
        second_after = queries_seen(second)
        proxy_log = proxy.log_text()

    late = [p for p in probes if p.sent >= stopped_at + FAILOVER_WITHIN]
    slow = [p for p in late if p.latency is None or p.latency > PROMPT]
    print(  # shown when the test fails
        f"dnsperf: {result}\nfirst unbound before the stop: {first_before}; second: "
        f"{second_before} before, {second_at_one_second} a second after the stop, "
        f"{second_after} at the end\nprobes: {len(probes)}, {len(late)} sent a second or "
        f"more after the stop, slow ones: {[(p.sent - stopped_at, p.latency) for p in slow]}"
        f"\nproxy log:\n{proxy_log[-2000:]}"
    )

    # Every query answered: none lost, and only answers a resolver gives (the zone's NOERROR
    # and NXDOMAIN, or SERVFAIL from the proxy at its deadline; never garbage or REFUSED).
    assert result.queries_completed > 1000, result
    assert result.queries_lost == 0, result
    assert set(result.rcodes) <= {"NOERROR", "NXDOMAIN", "SERVFAIL"}, result.rcodes
    # Failover is not "SERVFAIL for a while": almost every query got a real answer.
    assert result.rcodes.get("SERVFAIL", 0) <= 0.01 * result.queries_completed, result.rcodes

    # Before the stop the first unbound carried the load (failover order) ...
    assert first_before > 100
    assert second_before < first_before / 2
    # ... within a second of the stop the survivor carries it, and goes on carrying it after
    # the kill (only the survivor can answer now, and its log shows it).
    rate = result.queries_completed / result.run_time
    assert second_at_one_second - second_before > 0.3 * rate * FAILOVER_WITHIN
    after_kill = result.run_time - STOP_AFTER - FAILOVER_WITHIN
    assert second_after - second_at_one_second > 0.3 * rate * after_kill

    # The probe client, one query every 20 ms, saw at most a blip: every probe answered
    # NOERROR, and every probe sent a second or more after the stop answered promptly.
    assert len(probes) > 50
    assert all(p.rcode == dns.rcode.NOERROR for p in probes), [
        p for p in probes if p.rcode != dns.rcode.NOERROR
    ]
    assert len(late) > 20
    assert not slow, slow
