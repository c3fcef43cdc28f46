"""The real-DNS helpers the benchmark's cache rows use: the query files, the caching peers
(dnsdist's packet cache, unbound as a caching DoT forwarder) and unbound's counters."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.rcode
import pytest

from dot_proxy.testing import realdns

SMALL_ZONE = realdns.Zone(hosts=50)


def test_zone_questions_are_every_name_with_data_once() -> None:
    questions = realdns.zone_questions(SMALL_ZONE)

    assert len(questions) == len(set(questions)) == 50 * 2 + 50 // SMALL_ZONE.txt_every
    assert {q.split()[1] for q in questions} == {"A", "AAAA", "TXT"}
    assert "h49.test. AAAA" in questions
    assert "h10.test. TXT" in questions
    assert "h11.test. TXT" not in questions


def test_cache_query_files_put_the_hit_names_last_in_the_fill(tmp_path: Path) -> None:
    hits_file, fill_file = realdns.write_cache_queries(tmp_path, SMALL_ZONE, hits=10)
    hits = hits_file.read_text().splitlines()
    fill = fill_file.read_text().splitlines()

    assert len(hits) == len(set(hits)) == 10
    assert sorted(fill) == sorted(realdns.zone_questions(SMALL_ZONE))
    assert fill[-10:] == hits
    assert {q.split()[0] for q in hits} != {hits[0].split()[0]}  # spread, not one host


def test_cache_query_files_refuse_more_hits_than_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hits must be"):
        realdns.write_cache_queries(tmp_path, SMALL_ZONE, hits=1000)


def test_dnsdist_packet_cache_only_when_asked(pki: realdns.Pki, tmp_path: Path) -> None:
    plain = realdns.Dnsdist(pki, 853, workdir=tmp_path / "plain").config_text()
    cached = realdns.Dnsdist(pki, 853, packet_cache=500, workdir=tmp_path / "c").config_text()

    assert "PacketCache" not in plain
    assert "pc = newPacketCache(500)\n" in cached
    assert 'getPool(""):setCache(pc)\n' in cached


def test_unbound_forwarder_config_forwards_test_over_tls(pki: realdns.Pki, tmp_path: Path) -> None:
    text = realdns.UnboundForwarder(pki, 8853, workdir=tmp_path).config_text()

    assert "forward-zone:\n" in text
    assert "    forward-addr: 127.0.0.1@8853#dns.test\n" in text
    assert "    forward-tls-upstream: yes\n" in text
    assert f'tls-cert-bundle: "{pki.ca_file}"' in text
    assert 'local-zone: "test." nodefault' in text
    assert "control-enable: no" in text


# unbound with log-queries: "[1700000000] unbound[123:0] info: 127.0.0.1 h7.test. A IN"
def _asked(server: realdns.Unbound, question: str) -> int:
    pattern = re.compile(rf"info: \S+ {re.escape(question)} IN$", re.MULTILINE)
    return len(pattern.findall(server.log_text()))


@pytest.fixture
def logging_unbound(pki: realdns.Pki, tmp_path: Path) -> Iterator[realdns.Unbound]:
    with realdns.Unbound(
        pki, workdir=tmp_path / "upstream", extra_config=["log-queries: yes"]
    ) as server:
        yield server


@pytest.mark.e2e
@pytest.mark.parametrize("peer", ["dnsdist", "unbound"])
def test_caching_peer_answers_a_repeated_name_without_the_upstream(
    peer: str,
    logging_unbound: realdns.Unbound,
    pki: realdns.Pki,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools(peer)
    server: realdns.Dnsdist | realdns.UnboundForwarder
    if peer == "dnsdist":
        server = realdns.Dnsdist(
            pki, logging_unbound.tls_port, packet_cache=100, workdir=tmp_path / peer
        )
    else:
        server = realdns.UnboundForwarder(pki, logging_unbound.tls_port, workdir=tmp_path / peer)
    with server:
        answers = [realdns.udp_query(server.port, "h17.test.", "AAAA") for _ in range(3)]

        assert [rr.to_text() for rr in answers[-1].answer[0]] == [realdns.Zone.aaaa_address(17)]
        assert _asked(logging_unbound, "h17.test. AAAA") == 1


@pytest.mark.e2e
def test_unbound_statistics_count_the_queries_asked(
    pki: realdns.Pki, tmp_path: Path, require_tools: Callable[..., None]
) -> None:
    require_tools("unbound", "unbound-control")
    with realdns.Unbound(pki, workdir=tmp_path, control=True) as server:
        before = server.statistics()["total.num.queries"]
        for index in range(3):
            assert realdns.udp_query(server.plain_port, f"h{index}.test.").rcode() == 0

        assert server.statistics()["total.num.queries"] == before + 3


def test_unbound_statistics_need_control(pki: realdns.Pki, tmp_path: Path) -> None:
    with pytest.raises(realdns.RealDnsError, match="control=True"):
        realdns.Unbound(pki, workdir=tmp_path).statistics()


@pytest.mark.e2e
def test_caching_forwarder_answers_nxdomain_for_names_not_in_the_zone(
    unbound: realdns.Unbound,
    pki: realdns.Pki,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools("unbound")
    with realdns.UnboundForwarder(pki, unbound.tls_port, workdir=tmp_path) as server:
        answer = realdns.tcp_query(server.port, "nx3.test.", "A")

    assert answer.rcode() == dns.rcode.NXDOMAIN
