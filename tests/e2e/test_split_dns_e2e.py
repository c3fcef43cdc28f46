"""End to end, split DNS: ``python -m dot_proxy --forward ...`` between dig/kdig and two real
unbound instances, each serving its own zone (``test.`` and ``corp.example.``) and refusing
every other name, so an answer shows which one was asked.

The zone's unbound is reached over DoT, or over plain DNS on its cleartext port (``plain:``);
the built-in local zones and a hosts file (re-read on SIGHUP) are answered by the proxy itself.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dot_proxy.testing import realdns
from tests.e2e.test_cache_e2e import client
from tests.processes import wait_until

pytestmark = pytest.mark.e2e

Run = Callable[..., str]
# The company's zone: other names, and addresses of its own (198.19.x.y).
CORP = realdns.Zone(origin="corp.example.", hosts=20, address_base=19)
HOME = realdns.Zone()


@pytest.fixture(scope="module")
def corp(pki: realdns.Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[realdns.Unbound]:
    """A second unbound, serving only ``corp.example.`` (DoT and plain DNS)."""
    if realdns.missing_tools("unbound"):
        pytest.skip("unbound is not installed")  # the session fixture fails it under CI
    with realdns.Unbound(pki, CORP, workdir=tmp_path_factory.mktemp("unbound-corp")) as server:
        yield server


@pytest.fixture
def dig(require_tools: Callable[..., None]) -> Run:
    return client("dig", require_tools)


@pytest.fixture
def kdig(require_tools: Callable[..., None]) -> Run:
    return client("kdig", require_tools)


def status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    assert match, output
    return match.group(1)


def flags(output: str) -> list[str]:
    match = re.search(r"flags: ([a-z ]+);", output, re.IGNORECASE)
    assert match, output
    return match.group(1).split()


@pytest.mark.parametrize("transport", ["dot", "plain"])
def test_each_zone_is_answered_by_its_own_unbound(
    start_dot_proxy: Callable[..., realdns.DotProxy],
    corp: realdns.Unbound,
    dig: Run,
    kdig: Run,
    transport: str,
) -> None:
    target = corp.upstream_spec if transport == "dot" else f"plain:127.0.0.1:{corp.plain_port}"
    proxy = start_dot_proxy("--forward", f"corp.example.={target}")
    for run, extra in ((dig, []), (kdig, ["+tcp"])):
        output = run(proxy.port, *extra, CORP.host(7), "A")
        assert status(output) == "NOERROR", output
        assert CORP.a_address(7) in output
        output = run(proxy.port, *extra, CORP.host(3), "AAAA")
        assert CORP.aaaa_address(3) in output
        assert status(run(proxy.port, *extra, CORP.nxdomain_name(1), "A")) == "NXDOMAIN"
        # The default unbound still answers everything else (and would refuse corp.example).
        output = run(proxy.port, *extra, HOME.host(7), "A")
        assert status(output) == "NOERROR", output
        assert HOME.a_address(7) in output
    # Too big for UDP without EDNS: truncated, so dig asks again over TCP (and a plain:
    # resolver is asked again over TCP by the proxy).
    whole = dig(proxy.port, "+noedns", CORP.big_name, "TXT")
    assert status(whole) == "NOERROR"
    assert whole.count("big-") == CORP.big_records
    log = proxy.log_text()
    if transport == "plain":
        assert "leave in CLEARTEXT to plain:127.0.0.1" in log, log
    else:
        assert f"forwarding corp.example. over TLS to {corp.upstream_spec}" in log, log


def test_local_names_are_answered_by_the_proxy(
    start_dot_proxy: Callable[..., realdns.DotProxy], dig: Run, kdig: Run
) -> None:
    # The upstream refuses every name outside test.: an authoritative NXDOMAIN with the
    # zone's SOA can only come from the proxy's own local zones.
    proxy = start_dot_proxy()
    for run, name, rdtype, apex in (
        (dig, "1.1.168.192.in-addr.arpa", "PTR", "168.192.in-addr.arpa."),
        (kdig, "nas.home.arpa", "A", "home.arpa."),
        (dig, "printer.local", "AAAA", "local."),
    ):
        output = run(proxy.port, name, rdtype)
        assert status(output) == "NXDOMAIN", output
        assert "aa" in flags(output)
        assert re.search(rf"^{re.escape(apex)}\s+\d+\s+IN\s+SOA\s", output, re.MULTILINE), output
    output = kdig(proxy.port, "localhost", "A")
    assert "127.0.0.1" in output
    assert "::1" in dig(proxy.port, "db.localhost", "AAAA")


def test_the_hosts_file_is_answered_and_re_read_on_sighup(
    start_dot_proxy: Callable[..., realdns.DotProxy], tmp_path: Path, dig: Run, kdig: Run
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\nfd00::10 printer.lan\n")
    proxy = start_dot_proxy("--hosts", str(hosts))
    assert "192.168.1.10" in dig(proxy.port, "printer.lan", "A")
    assert "fd00::10" in kdig(proxy.port, "printer.lan", "AAAA")
    assert "printer.lan." in dig(proxy.port, "-x", "192.168.1.10")
    assert "1 names and 2 addresses answered here" in proxy.log_text()

    hosts.write_text("192.168.1.10 printer.lan\n192.168.1.20 nas.lan\n")
    proxy.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "re-read" in proxy.log_text(), "the hosts file re-read on SIGHUP")
    output = dig(proxy.port, "nas.lan", "A")
    assert "192.168.1.20" in output, proxy.log_text()
    nodata = dig(proxy.port, "printer.lan", "AAAA")
    assert status(nodata) == "NOERROR"
    assert "ANSWER: 0" in nodata
    assert proxy.process.poll() is None  # SIGHUP never stops it
