"""End to end, as an operator runs it: Prometheus, promtool, curl, SIGHUP, and workers.

``python -m dot_proxy --metrics`` forwards to real unbound; a real Prometheus (Debian's
package, 1 s scrape interval, temporary store, loopback) scrapes it while dnsperf loads it;
promtool checks the exposition; curl asks the health paths; a changed config file and SIGHUP
move the traffic to a second unbound while dnsperf runs, losing nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dot_proxy.testing import realdns
from dot_proxy.testing.observability import Prometheus, http_get, scrape, total
from tests.processes import wait_until

pytestmark = pytest.mark.e2e

# Physical time on a busy machine: bounds a broken run only, never a speed assertion.
WITHIN = 30.0
_QUERY_LINE = re.compile(r"info: \S+ (\S+) \S+ IN$", re.MULTILINE)


def queries_seen(server: realdns.Unbound) -> int:
    """Queries for the test zone ``server`` has logged (the proxy's probes for ``.`` not)."""
    return sum(1 for name in _QUERY_LINE.findall(server.log_text()) if name.endswith("test."))


def metrics_proxy(
    pki: realdns.Pki, upstreams: list[str], workdir: Path, *extra: str
) -> tuple[realdns.DotProxy, int]:
    port = realdns.free_port("tcp")
    proxy = realdns.DotProxy(
        pki, upstreams, extra_args=["--metrics", f"127.0.0.1:{port}", *extra], workdir=workdir
    )
    return proxy, port


def test_prometheus_scrapes_the_proxy_while_dnsperf_runs(
    pki: realdns.Pki,
    unbound: realdns.Unbound,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools("dnsperf", "prometheus")
    proxy, port = metrics_proxy(pki, [unbound.upstream_spec], tmp_path / "proxy")
    queries = realdns.write_queries(tmp_path / "queries.txt", count=2000)
    with proxy, Prometheus(f"127.0.0.1:{port}", workdir=tmp_path / "prometheus") as prometheus:
        wait_until(lambda: bool(prometheus.query('up{job="dot-proxy"} == 1')), "a first scrape")
        before = total(scrape(port), "dot_proxy_queries_total")
        result = realdns.run_dnsperf(
            proxy.port, queries, mode="udp", clients=4, seconds=3, max_qps=1500
        )
        expected = before + result.queries_sent
        assert result.queries_lost == 0, result

        def scraped_all() -> bool:
            found = prometheus.query("sum(dot_proxy_queries_total)")
            return bool(found) and found[0][1] == expected

        wait_until(scraped_all, f"Prometheus to see {expected} queries")
        assert prometheus.query('up{job="dot-proxy"}')[0][1] == 1.0
        answered = prometheus.query('sum(dot_proxy_responses_total{rcode="NOERROR"})')[0][1]
        assert answered >= result.rcodes.get("NOERROR", 0)
        count = prometheus.query("sum(dot_proxy_query_duration_seconds_count)")[0][1]
        assert count >= result.queries_completed
        p99 = prometheus.query(
            "histogram_quantile(0.99, rate(dot_proxy_query_duration_seconds_bucket[1m]))"
        )
        assert p99 and p99[0][1] > 0
        spec = unbound.upstream_spec
        up = prometheus.query(f'dot_proxy_upstream_up{{upstream="{spec}"}}')
        assert up and up[0][1] == 1.0


def test_promtool_accepts_the_exposition_and_curl_sees_the_health_paths(
    pki: realdns.Pki,
    unbound: realdns.Unbound,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools("promtool", "curl")
    proxy, port = metrics_proxy(pki, [unbound.upstream_spec], tmp_path / "proxy")
    base = f"http://127.0.0.1:{port}"
    with proxy:
        realdns.udp_query(proxy.port, "h1.test.")
        exposition = subprocess.run(
            ["curl", "-sf", f"{base}/metrics"], capture_output=True, check=True, timeout=WITHIN
        ).stdout
        checked = subprocess.run(
            [realdns.find_tool("promtool") or "promtool", "check", "metrics"],
            input=exposition,
            capture_output=True,
            check=False,
            timeout=WITHIN,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == b"", checked.stdout  # no lint complaint either

        def curl(path: str) -> tuple[str, str]:
            done = subprocess.run(
                ["curl", "-s", "-w", "\n%{http_code}", f"{base}{path}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=WITHIN,
            )
            body, _, status = done.stdout.rpartition("\n")
            return status, body

        assert curl("/healthz") == ("200", "ok\n")
        assert curl("/readyz") == ("200", "ready\n")
        assert curl("/nothing")[0] == "404"


def test_sighup_moves_traffic_to_a_second_unbound_with_no_query_lost(
    pki: realdns.Pki, tmp_path: Path, require_tools: Callable[..., None]
) -> None:
    require_tools("unbound", "dnsperf")
    log_queries = ["log-queries: yes"]
    config = tmp_path / "dot-proxy.toml"
    with (
        realdns.Unbound(pki, workdir=tmp_path / "first", extra_config=log_queries) as first,
        realdns.Unbound(pki, workdir=tmp_path / "second", extra_config=log_queries) as second,
    ):
        config.write_text(f'upstream = ["{first.upstream_spec}"]\n')
        proxy, port = metrics_proxy(pki, [], tmp_path / "proxy", "--config", str(config))
        queries = realdns.write_queries(tmp_path / "queries.txt", count=3000)
        with proxy:
            outcome: dict[str, object] = {}

            def load() -> None:
                try:
                    outcome["result"] = realdns.run_dnsperf(
                        proxy.port, queries, mode="udp", clients=4, seconds=5, max_qps=600
                    )
                except BaseException as exc:  # reported below
                    outcome["error"] = exc

            loader = threading.Thread(target=load, name="dnsperf")
            loader.start()
            time.sleep(2.0)
            second_before = queries_seen(second)
            config.write_text(f'upstream = ["{second.upstream_spec}"]\n')
            proxy.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "reloaded" in proxy.log_text(), "the reload")
            time.sleep(0.5)  # the queries already sent to the first have had time to finish
            first_after_reload = queries_seen(first)
            loader.join(timeout=WITHIN)
            assert not loader.is_alive()
            if isinstance(outcome.get("error"), BaseException):
                raise AssertionError("dnsperf failed") from outcome["error"]  # type: ignore[misc]
            result = outcome["result"]
            assert isinstance(result, realdns.DnsperfResult)
            metrics = scrape(port)
            log = proxy.log_text()
    print(f"dnsperf: {result}\nproxy log:\n{log[-2000:]}")  # shown when the test fails
    assert result.queries_lost == 0, result
    assert set(result.rcodes) <= {"NOERROR", "NXDOMAIN"}, result.rcodes
    assert second_before <= 1  # its own start-up probe only
    assert queries_seen(second) - second_before > 300  # the load moved there
    assert queries_seen(first) == first_after_reload  # and none went on to the first
    assert metrics['dot_proxy_config_reloads_total{result="success"}'] == 1
    moved = metrics[f'dot_proxy_upstream_queries_total{{upstream="{second.upstream_spec}"}}']
    assert moved > 300


def test_workers_one_endpoint_adds_them_up_and_a_restart_does_not_go_back(
    pki: realdns.Pki,
    unbound: realdns.Unbound,
    tmp_path: Path,
    require_tools: Callable[..., None],
) -> None:
    require_tools("dnsperf")
    proxy, port = metrics_proxy(pki, [unbound.upstream_spec], tmp_path / "proxy", "--workers", "2")
    queries = realdns.write_queries(tmp_path / "queries.txt", count=2000)
    with proxy:
        time.sleep(1.5)  # both workers have published
        metrics = scrape(port)
        assert set(re.findall(r'process_open_fds\{worker="(\d)"\}', " ".join(metrics))) == {
            "0",
            "1",
        }
        before = total(metrics, "dot_proxy_queries_total")
        result = realdns.run_dnsperf(proxy.port, queries, mode="udp", clients=8, seconds=2)
        expected = before + result.queries_sent
        wait_until(
            lambda: total(scrape(port), "dot_proxy_queries_total") == expected,
            f"the sum over workers to reach {expected}",
        )
        workers = realdns.process_tree(proxy.pid)[1:]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: (
                len(realdns.process_tree(proxy.pid)) == 3
                and workers[0] not in realdns.process_tree(proxy.pid)
            ),
            "the worker's restart",
        )
        # Everything was published before the crash: the sum never goes below it, whichever
        # worker answers the scrape, the new one included.
        for _ in range(6):
            assert total(scrape(port), "dot_proxy_queries_total") >= expected
            time.sleep(0.3)
        assert http_get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")


def test_with_workers_sighup_reloads_every_worker(
    pki: realdns.Pki, unbound: realdns.Unbound, tmp_path: Path
) -> None:
    config = tmp_path / "dot-proxy.toml"
    config.write_text(f'upstream = ["{unbound.upstream_spec}"]\n')
    proxy, port = metrics_proxy(
        pki, [], tmp_path / "proxy", "--config", str(config), "--workers", "2"
    )
    with proxy:
        config.write_text(
            f'upstream = ["{unbound.upstream_spec}"]\ntimeout = 3\nmax-in-flight = 10\n'
        )
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.log_text().count(": timeout") == 2, "both workers reloading")
        log = proxy.log_text()
        assert log.count("max-in-flight changed, which takes a restart") == 2
        wait_until(
            lambda: scrape(port)['dot_proxy_config_reloads_total{result="success"}'] == 1,
            "the reload counted once",
        )
        assert realdns.udp_query(proxy.port, "h2.test.").rcode() == 0
        # A bad file: each worker says so in one line, and serves on.
        config.write_text("timeout = 'x'\n")
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.log_text().count("reload failed") == 2, "both refusing it")
        wait_until(
            lambda: scrape(port)['dot_proxy_config_reloads_total{result="error"}'] == 1,
            "the failed reload counted",
        )
        assert realdns.udp_query(proxy.port, "h3.test.").rcode() == 0
