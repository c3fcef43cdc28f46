"""``dot-proxy check`` in-process: the test query, and what each answer means for the verdict."""

from __future__ import annotations

from collections.abc import Callable

import dns.flags
import dns.message
import dns.rcode
import pytest

from dot_proxy.check import TEST_QUERY, make_test_query, run_check
from dot_proxy.config import Config, parse_upstream
from dot_proxy.errors import ConfigError
from tests.conftest import StartUpstream
from tests.fakes import answering


@pytest.mark.parametrize("name", ["h0.test", "h0.test.", "_dmarc.example.com", "xn--bcher-kva.de"])
def test_the_test_query_for_a_name_asks_its_a_record(name: str) -> None:
    query = dns.message.from_wire(make_test_query(name))
    assert query.question[0].to_text() == f"{name.rstrip('.')}. IN A"
    assert query.flags & dns.flags.RD


def test_the_default_test_query_asks_the_roots_ns_records() -> None:
    assert make_test_query(".") == TEST_QUERY
    assert dns.message.from_wire(TEST_QUERY).question[0].to_text() == ". IN NS"


@pytest.mark.parametrize(
    "name", ["a..b", "x" * 64 + ".test", "bücher.de", ".".join(["x" * 60] * 5)]
)
def test_a_name_that_is_not_one_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^--query: "):
        make_test_query(name)


def _rcode_answer(rcode: int) -> Callable[[bytes], bytes]:
    def make(query: bytes) -> bytes:
        response = dns.message.make_response(dns.message.from_wire(query))
        response.set_rcode(rcode)
        wire: bytes = response.to_wire()
        return wire

    return make


@pytest.mark.parametrize(
    ("rcode", "status", "says"),
    [
        (dns.rcode.NOERROR, 0, "OK"),
        (dns.rcode.NXDOMAIN, 0, "OK"),
        (dns.rcode.REFUSED, 1, "FAILED: REFUSED: the upstream is reached and authenticated"),
        (dns.rcode.SERVFAIL, 1, "FAILED: SERVFAIL: the upstream could not resolve it"),
        (dns.rcode.NOTIMP, 1, "FAILED: NOTIMP: the test query was not resolved"),
    ],
)
async def test_only_an_answer_that_resolved_passes(
    start_upstream: StartUpstream, ca_file: str, rcode: int, status: int, says: str
) -> None:
    upstream = await start_upstream(answering(_rcode_answer(rcode)))
    config = Config(upstreams=(parse_upstream(upstream.spec),), ca_file=ca_file)
    lines: list[str] = []
    assert await run_check(config, out=lines.append) == status
    assert lines[0] == upstream.spec
    assert f"  query:   . NS answered {dns.rcode.to_text(rcode)} in " in "\n".join(lines)
    assert lines[-1].startswith("  " + says), lines
