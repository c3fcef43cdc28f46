"""The real-DNS fixtures themselves: unbound's zone, its certificate, the peers, dnsperf parsing."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from dot_proxy.testing import realdns

# dnspython's default EDNS payload and the DNS Flag Day 2020 size: big.test must exceed it.
EDNS_SAFE_SIZE = 1232


@pytest.mark.e2e
def test_unbound_answers_a_and_aaaa_over_dot(unbound: realdns.Unbound, pki: realdns.Pki) -> None:
    a = realdns.dot_query(unbound.tls_port, "h1.test", "A", pki=pki)
    aaaa = realdns.dot_query(unbound.tls_port, "h1.test", "AAAA", pki=pki)

    assert a.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rr in a.answer[0]] == [realdns.Zone().a_address(1)]
    assert [rr.to_text() for rr in aaaa.answer[0]] == [realdns.Zone.aaaa_address(1)]


@pytest.mark.e2e
def test_upstream_spec_names_the_tls_port(unbound: realdns.Unbound) -> None:
    assert unbound.upstream_spec == f"127.0.0.1:{unbound.tls_port}#dns.test"


@pytest.mark.e2e
def test_big_answer_is_larger_than_the_edns_safe_size(
    unbound: realdns.Unbound, pki: realdns.Pki
) -> None:
    answer = realdns.dot_query(unbound.tls_port, "big.test", "TXT", pki=pki)

    assert len(answer.answer[0]) == realdns.Zone().big_records
    assert len(answer.to_wire()) > EDNS_SAFE_SIZE


@pytest.mark.e2e
def test_big_answer_over_plain_udp_is_truncated(unbound: realdns.Unbound) -> None:
    answer = realdns.udp_query(unbound.plain_port, "big.test", "TXT")

    assert answer.flags & dns.flags.TC


@pytest.mark.e2e
def test_mid_answer_is_between_512_and_1232_bytes(
    unbound: realdns.Unbound, pki: realdns.Pki
) -> None:
    answer = realdns.dot_query(unbound.tls_port, "mid.test", "TXT", pki=pki)

    assert 512 < len(answer.to_wire()) < EDNS_SAFE_SIZE


@pytest.mark.e2e
def test_unknown_name_in_zone_is_nxdomain(unbound: realdns.Unbound, pki: realdns.Pki) -> None:
    answer = realdns.dot_query(unbound.tls_port, "nx42.test", "A", pki=pki)

    assert answer.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.e2e
def test_name_outside_zone_is_refused_at_once(unbound: realdns.Unbound) -> None:
    started = time.monotonic()
    answer = realdns.udp_query(unbound.plain_port, "example.com", "A")

    assert answer.rcode() == dns.rcode.REFUSED
    assert time.monotonic() - started < 1.0


@pytest.mark.e2e
def test_certificate_is_not_valid_for_other_names(
    unbound: realdns.Unbound, pki: realdns.Pki
) -> None:
    query = dns.message.make_query("h1.test", "A")

    with pytest.raises(ssl.SSLCertVerificationError):
        dns.query.tls(
            query,
            "127.0.0.1",
            timeout=2,
            port=unbound.tls_port,
            ssl_context=pki.client_context(),
            server_hostname="other.test",
        )


@pytest.mark.e2e
@pytest.mark.parametrize("peer", [realdns.Stubby, realdns.Dnsdist], ids=lambda c: c.name)
def test_peer_forwards_to_unbound(
    peer: type[realdns.Stubby] | type[realdns.Dnsdist],
    unbound: realdns.Unbound,
    pki: realdns.Pki,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools(peer.name)
    with peer(pki, unbound.tls_port, workdir=tmp_path) as server:
        udp = realdns.udp_query(server.port, "h7.test", "AAAA")
        tcp = realdns.tcp_query(server.port, "big.test", "TXT")

    assert [rr.to_text() for rr in udp.answer[0]] == [realdns.Zone.aaaa_address(7)]
    assert len(tcp.answer[0]) == realdns.Zone().big_records


@pytest.mark.e2e
def test_dot_proxy_fixture_forwards_to_unbound(
    start_dot_proxy: Callable[..., realdns.DotProxy],
) -> None:
    proxy = start_dot_proxy()

    udp = realdns.udp_query(proxy.port, "h7.test", "A")
    tcp = realdns.tcp_query(proxy.port, "big.test", "TXT")

    assert [rr.to_text() for rr in udp.answer[0]] == [realdns.Zone().a_address(7)]
    assert len(tcp.answer[0]) == realdns.Zone().big_records
    assert proxy.stop() == 0  # the CLI contract: SIGTERM exits 0


@pytest.mark.e2e
def test_unbound_restart_keeps_its_port(
    pki: realdns.Pki, tmp_path: Path, require_tools: Callable[..., None]
) -> None:
    require_tools("unbound")
    with realdns.Unbound(pki, workdir=tmp_path) as server:
        port, first_pid = server.tls_port, server.pid

        server.restart()

        assert (server.tls_port, server.pid != first_pid) == (port, True)
        assert realdns.dot_query(port, "h2.test", pki=pki).rcode() == dns.rcode.NOERROR


def test_free_port_is_free_for_tcp_and_udp() -> None:
    port = realdns.free_port()

    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        tcp.bind(("127.0.0.1", port))
        udp.bind(("127.0.0.1", port))


def test_query_file_mixes_types_and_nxdomain(tmp_path: Path) -> None:
    lines = realdns.write_queries(tmp_path / "q.txt", count=1000).read_text().splitlines()
    types = {line.split()[1] for line in lines}
    names = {line.split()[0] for line in lines}

    assert types == {"A", "AAAA", "TXT"}
    assert any(name.startswith("nx") for name in names)
    assert not {"big.test.", "mid.test."} & names


DNSPERF_DOT_OUTPUT = """\
[Status] Command line: dnsperf -s 127.0.0.1 -p 853 -m dot -d q.txt -l 2 -c 4 -v
> NOERROR h1.test A 0.000161
> NXDOMAIN nx.test A 0.000150
> NOERROR h1.test AAAA 0.000224
Statistics:

  Queries sent:         3
  Queries completed:    3 (100.00%)
  Queries lost:         0 (0.00%)

  Response codes:       NOERROR 2 (66.67%), NXDOMAIN 1 (33.33%)
  Average packet size:  request 25, response 30
  Run time (s):         2.042777
  Queries per second:   65638.099509

  Average Latency (s):  0.001420 (min 0.000142, max 0.042901)
  Latency StdDev (s):   0.000558

Connection Statistics:

  Reconnections:        0

  Average Latency (s):  0.003993 (min 0.002467, max 0.005463)
  Latency StdDev (s):   0.001228
"""


def test_parse_dnsperf_reads_the_query_summary_not_the_connection_one() -> None:
    result = realdns.parse_dnsperf(DNSPERF_DOT_OUTPUT, command="dnsperf", mode="dot", clients=4)

    assert (result.queries_sent, result.queries_completed, result.queries_lost) == (3, 3, 0)
    assert dict(result.rcodes) == {"NOERROR": 2, "NXDOMAIN": 1}
    assert result.qps == pytest.approx(65638.099509)
    assert (result.latency_avg, result.latency_max) == (0.001420, 0.042901)
    assert result.latency_stddev == 0.000558
    assert result.p50 == 0.000161
    assert result.p99 == 0.000224


@pytest.mark.e2e
def test_dnsperf_runs_against_unbound(
    unbound: realdns.Unbound, tmp_path: Path, require_tools: Callable[..., None]
) -> None:
    require_tools("dnsperf")
    queries = realdns.write_queries(tmp_path / "q.txt", count=100)

    result = realdns.run_dnsperf(unbound.plain_port, queries, clients=2, seconds=1)

    assert result.queries_completed > 0
    assert result.queries_lost == 0
    assert set(result.rcodes) <= {"NOERROR", "NXDOMAIN"}
    assert f"-p {unbound.plain_port}" in result.command
