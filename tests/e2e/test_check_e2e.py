"""``dot-proxy check`` against a real unbound: what a user runs when resolution breaks."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

from dot_proxy.core.pins import spki_sha256_b64
from dot_proxy.testing import realdns

pytestmark = pytest.mark.e2e


def check(
    pki: realdns.Pki, *upstreams: str, query: str = "h0.test"
) -> subprocess.CompletedProcess[str]:
    # The test unbound serves only the zone test. (and refuses the rest): ask a name in it.
    argv = [sys.executable, "-m", "dot_proxy", "check", "--ca-file", str(pki.ca_file)]
    argv += ["--query", query]
    for upstream in upstreams:
        argv += ["--upstream", upstream]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def server_pin(pki: realdns.Pki) -> str:
    pem = pki.cert_file.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return spki_sha256_b64(ssl.PEM_cert_to_DER_cert(first + "\n"))


def test_a_working_upstream_is_reported_ok_with_its_pin(
    pki: realdns.Pki, unbound: realdns.Unbound
) -> None:
    result = check(pki, unbound.upstream_spec)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLSv1.3" in result.stdout or "TLSv1.2" in result.stdout
    assert "dns.test" in result.stdout  # the certificate's names
    assert server_pin(pki) in result.stdout
    assert "query:   h0.test A answered NOERROR in" in result.stdout
    assert result.stdout.rstrip().endswith("OK")


def test_a_refused_test_query_fails_and_says_what_refused_means(
    pki: realdns.Pki, unbound: realdns.Unbound
) -> None:
    # unbound refuses every name outside test.: reachable, authenticated, of no use to us.
    result = check(pki, unbound.upstream_spec, query=".")
    assert result.returncode == 1, result.stdout
    assert "query:   . NS answered REFUSED" in result.stdout
    assert "FAILED: REFUSED: the upstream is reached and authenticated but will not resolve" in (
        result.stdout
    )
    assert "  OK" not in result.stdout.splitlines()
    # A name it does not have is an answer all the same.
    assert check(pki, unbound.upstream_spec, query="nx1.test").returncode == 0


def test_a_wrong_name_fails_and_shows_the_presented_pin(
    pki: realdns.Pki, unbound: realdns.Unbound
) -> None:
    result = check(pki, f"127.0.0.1:{unbound.tls_port}#wrong.test")
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert "wrong.test" in result.stdout
    assert f"presented key pin: {server_pin(pki)}" in result.stdout


def test_pins_alone_pass_and_a_wrong_pin_fails(pki: realdns.Pki, unbound: realdns.Unbound) -> None:
    good = check(pki, f"127.0.0.1:{unbound.tls_port}^{server_pin(pki)}")
    assert good.returncode == 0, good.stdout
    assert good.stdout.startswith(f"127.0.0.1:{unbound.tls_port} ^1 pin(s), no name checked\n")
    assert "pins:    match" in good.stdout
    bad = check(pki, f"127.0.0.1:{unbound.tls_port}#dns.test^{'A' * 43}=")
    assert bad.returncode == 1
    assert "matches none of the configured pins" in bad.stdout


def test_one_failing_upstream_of_two_fails_the_check(
    pki: realdns.Pki, unbound: realdns.Unbound
) -> None:
    with realdns.closed_port() as closed:
        result = check(pki, unbound.upstream_spec, f"127.0.0.1:{closed}#dns.test")
    assert result.returncode == 1
    # The verdict lines, not "OK" anywhere: a base64 pin may hold those letters.
    assert result.stdout.splitlines().count("  OK") == 1
    assert "connect failed" in result.stdout
