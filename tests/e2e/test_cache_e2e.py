"""End to end, the cache: ``python -m dot_proxy`` (cache on, as by default) in front of a real
unbound that logs every query it gets, with dig and kdig as the clients."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from dot_proxy.testing import realdns

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def logging_unbound(
    pki: realdns.Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[realdns.Unbound]:
    """An unbound of our own that writes one log line per query it is asked."""
    if realdns.missing_tools("unbound"):
        pytest.skip("unbound is not installed")  # the session fixture fails it under CI
    with realdns.Unbound(
        pki, workdir=tmp_path_factory.mktemp("unbound-log"), extra_config=["log-queries: yes"]
    ) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(
    pki: realdns.Pki,
    logging_unbound: realdns.Unbound,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realdns.DotProxy]:
    with realdns.DotProxy(
        pki, [logging_unbound.upstream_spec], workdir=tmp_path_factory.mktemp("proxy")
    ) as running:
        yield running


def asked(unbound: realdns.Unbound, name: str, rdtype: str) -> int:
    """How many times unbound was asked ``name rdtype`` (its log-queries lines)."""
    pattern = re.compile(rf"\b{re.escape(name)} {rdtype} IN\b", re.IGNORECASE)
    return sum(1 for line in unbound.log_text().splitlines() if pattern.search(line))


def client(tool: str, require_tools: Callable[..., None]) -> Callable[..., str]:
    require_tools(tool)

    def run(port: int, *args: str) -> str:
        completed = subprocess.run(
            [tool, "@127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed.stdout

    return run


def answer_ttls(output: str, name: str) -> list[int]:
    # "h5.test.   298 IN A 198.18.0.5" in dig's and kdig's answer sections.
    pattern = re.compile(rf"^{re.escape(name)}\s+(\d+)\s+IN\s", re.IGNORECASE | re.MULTILINE)
    return [int(ttl) for ttl in pattern.findall(output)]


def wait_for_log(unbound: realdns.Unbound, name: str, rdtype: str, count: int) -> None:
    # unbound writes its log line as it answers; give a loaded machine a moment.
    deadline = time.monotonic() + 5
    while asked(unbound, name, rdtype) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_second_query_does_not_reach_the_upstream(
    proxy: realdns.DotProxy,
    logging_unbound: realdns.Unbound,
    require_tools: Callable[..., None],
) -> None:
    dig = client("dig", require_tools)
    name = realdns.Zone().host(101)
    for _ in range(3):
        assert "status: NOERROR" in dig(proxy.port, name, "A")
    wait_for_log(logging_unbound, name, "A", 1)
    time.sleep(0.2)
    assert asked(logging_unbound, name, "A") == 1


def test_ttls_go_down_between_two_queries_two_seconds_apart(
    proxy: realdns.DotProxy, require_tools: Callable[..., None]
) -> None:
    dig = client("dig", require_tools)
    zone = realdns.Zone()
    name = zone.host(102)
    first = answer_ttls(dig(proxy.port, name, "A"), name)
    time.sleep(2.2)
    second = answer_ttls(dig(proxy.port, name, "A"), name)
    assert first == [zone.ttl]
    assert len(second) == 1
    assert zone.ttl - 3 <= second[0] <= zone.ttl - 2


def test_a_big_answer_fetched_over_tcp_reaches_a_plain_udp_client_truncated(
    proxy: realdns.DotProxy,
    logging_unbound: realdns.Unbound,
    require_tools: Callable[..., None],
) -> None:
    dig = client("dig", require_tools)
    zone = realdns.Zone()
    whole = dig(proxy.port, "+tcp", zone.big_name, "TXT")
    assert f"ANSWER: {zone.big_records}" in whole
    cut = dig(proxy.port, "+noedns", "+ignore", zone.big_name, "TXT")
    assert re.search(r"flags:[^;]*\btc\b", cut), cut
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", cut).group(1))  # type: ignore[union-attr]
    assert size <= 512
    wait_for_log(logging_unbound, zone.big_name, "TXT", 1)
    time.sleep(0.2)
    assert asked(logging_unbound, zone.big_name, "TXT") == 1


@pytest.mark.parametrize("tool", ["dig", "kdig"])
def test_a_client_sees_its_own_letter_case_from_the_cache(
    proxy: realdns.DotProxy,
    logging_unbound: realdns.Unbound,
    require_tools: Callable[..., None],
    tool: str,
) -> None:
    run = client(tool, require_tools)
    name = realdns.Zone().host(103 if tool == "dig" else 104)
    run(proxy.port, name, "A")
    mixed = name.upper().replace("TEST", "tEsT")
    output = run(proxy.port, mixed, "A")
    assert "NOERROR" in output
    assert "WARNING" not in output  # kdig and dig both warn of a reply to another question
    if tool == "dig":  # kdig prints names in lower case whatever came back
        assert re.search(rf"^;{re.escape(mixed)}\s+IN\s+A$", output, re.MULTILINE), output
    time.sleep(0.2)
    assert asked(logging_unbound, name, "A") == 1
