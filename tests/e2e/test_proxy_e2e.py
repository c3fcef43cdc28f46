"""End to end: ``python -m dot_proxy`` between real clients (kdig, dig) and a real unbound.

unbound serves the test zone over DoT on loopback with a trustme certificate; the proxy runs as
a subprocess exactly as a user would start it; the clients are the ones the seed README shows.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from dot_proxy.testing import realdns

pytestmark = pytest.mark.e2e

Run = Callable[..., str]


@pytest.fixture(scope="module")
def proxy(
    pki: realdns.Pki, unbound: realdns.Unbound, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[realdns.DotProxy]:
    with realdns.DotProxy(
        pki, [unbound.upstream_spec], workdir=tmp_path_factory.mktemp("proxy")
    ) as running:
        yield running


def _run(*argv: str) -> str:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


@pytest.fixture
def kdig(require_tools: Callable[..., None]) -> Run:
    require_tools("kdig")
    return lambda port, *args: _run("kdig", "@127.0.0.1", "-p", str(port), *args)


@pytest.fixture
def dig(require_tools: Callable[..., None]) -> Run:
    require_tools("dig")
    return lambda port, *args: _run("dig", "@127.0.0.1", "-p", str(port), *args)


def _status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("transport", [[], ["+tcp"]], ids=["udp", "tcp"])
def test_kdig_gets_the_zone_answer(
    proxy: realdns.DotProxy, kdig: Run, transport: list[str]
) -> None:
    zone = realdns.Zone()
    output = kdig(proxy.port, *transport, zone.host(7), "A")
    assert _status(output) == "NOERROR"
    assert zone.a_address(7) in output
    assert ("(TCP)" if transport else "(UDP)") in output


@pytest.mark.parametrize("transport", [[], ["+tcp"]], ids=["udp", "tcp"])
def test_dig_gets_aaaa_and_nxdomain(
    proxy: realdns.DotProxy, dig: Run, transport: list[str]
) -> None:
    zone = realdns.Zone()
    output = dig(proxy.port, *transport, zone.host(42), "AAAA")
    assert _status(output) == "NOERROR"
    assert zone.aaaa_address(42) in output
    assert _status(dig(proxy.port, *transport, zone.nxdomain_name(3), "A")) == "NXDOMAIN"


def test_big_answer_is_truncated_over_udp_and_whole_over_tcp(
    proxy: realdns.DotProxy, dig: Run
) -> None:
    zone = realdns.Zone()
    # +ignore: show the truncated UDP answer instead of retrying over TCP.
    truncated = dig(proxy.port, "+ignore", "+bufsize=1232", zone.big_name, "TXT")
    assert re.search(r"flags:[^;]*\btc\b", truncated), truncated
    assert "ANSWER: 0" in truncated
    assert "EDNS: version: 0" in truncated  # the OPT record survives truncation
    whole = dig(proxy.port, "+tcp", zone.big_name, "TXT")
    assert _status(whole) == "NOERROR"
    assert f"ANSWER: {zone.big_records}" in whole
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", whole).group(1))  # type: ignore[union-attr]
    assert size > 1232


def test_dig_retries_a_truncated_answer_over_tcp(proxy: realdns.DotProxy, dig: Run) -> None:
    zone = realdns.Zone()
    output = dig(proxy.port, zone.big_name, "TXT")  # dig's default: retry over TCP on TC
    assert "Truncated, retrying in TCP mode" in output
    assert f"ANSWER: {zone.big_records}" in output


def test_mid_size_answer_fits_edns_but_not_512(proxy: realdns.DotProxy, kdig: Run) -> None:
    zone = realdns.Zone()
    with_edns = kdig(proxy.port, "+bufsize=1232", "+ignore", zone.mid_name, "TXT")
    assert f"ANSWER: {zone.mid_records}" in with_edns
    without_edns = kdig(proxy.port, "+noedns", "+ignore", zone.mid_name, "TXT")
    assert re.search(r"Flags:[^;]*\btc\b", without_edns), without_edns


def test_kdig_pipelines_several_queries_on_one_tcp_connection(
    proxy: realdns.DotProxy, kdig: Run
) -> None:
    zone = realdns.Zone()
    names = [zone.host(index) for index in range(1, 6)]
    args: list[str] = ["+tcp", "+keepopen"]
    for name in names:
        args += [name, "A"]
    output = kdig(proxy.port, *args)
    assert output.count("status: NOERROR") == len(names)
    for index in range(1, 6):
        assert zone.a_address(index) in output


def test_dnssec_ok_bit_and_edns_pass_through(proxy: realdns.DotProxy, dig: Run) -> None:
    output = dig(proxy.port, "+dnssec", "+bufsize=4096", realdns.Zone().host(1), "A")
    assert _status(output) == "NOERROR"
    assert re.search(r"EDNS: version: 0, flags: do", output), output


def test_unreachable_upstream_gives_servfail_quickly(
    pki: realdns.Pki, dig: Run, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with (
        realdns.closed_port() as closed_port,
        realdns.DotProxy(
            pki,
            [f"127.0.0.1:{closed_port}#{pki.auth_name}"],
            workdir=tmp_path_factory.mktemp("proxy-down"),
            probe_name=None,
        ) as down,
    ):
        output = dig(down.port, "+tries=1", "+time=4", realdns.Zone().host(1), "A")
    assert _status(output) == "SERVFAIL"


def test_wrong_certificate_name_gives_servfail(
    pki: realdns.Pki,
    unbound: realdns.Unbound,
    kdig: Run,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with realdns.DotProxy(
        pki,
        [f"127.0.0.1:{unbound.tls_port}#not-the-name.test"],
        workdir=tmp_path_factory.mktemp("proxy-badname"),
        probe_name=None,
    ) as mismatched:
        output = kdig(mismatched.port, "+retry=0", realdns.Zone().host(1), "A")
        log = mismatched.log_text()
    assert _status(output) == "SERVFAIL"
    assert "certificate" in log


def test_sigterm_stops_the_proxy_with_exit_status_0(
    pki: realdns.Pki, unbound: realdns.Unbound, tmp_path_factory: pytest.TempPathFactory
) -> None:
    running = realdns.DotProxy(
        pki, [unbound.upstream_spec], workdir=tmp_path_factory.mktemp("proxy-term")
    ).start()
    try:
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=10) == 0
    finally:
        running.cleanup()


@pytest.mark.parametrize("mode", ["udp", "tcp"])
def test_two_workers_answer_dnsperf_without_loss(
    start_dot_proxy: Callable[..., realdns.DotProxy],
    require_tools: Callable[..., None],
    tmp_path_factory: pytest.TempPathFactory,
    mode: realdns.DnsperfMode,
) -> None:
    # --workers 2 under load, each worker with its own TLS pool to unbound: every query gets
    # the zone's answer (NOERROR or NXDOMAIN), none is lost, and SIGTERM stops them with 0.
    require_tools("dnsperf")
    proxy = start_dot_proxy("--workers", "2")
    queries = realdns.write_queries(tmp_path_factory.mktemp("q") / "q.txt", realdns.Zone())
    result = realdns.run_dnsperf(proxy.port, queries, mode=mode, clients=10, seconds=2)
    assert result.queries_completed > 0
    assert result.queries_lost == 0
    assert set(result.rcodes) <= {"NOERROR", "NXDOMAIN"}, result.rcodes
    assert proxy.stop() == 0
