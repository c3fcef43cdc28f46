"""The operator's side of dot-proxy, for tests and the soak: its /metrics, and Prometheus.

- :func:`scrape` reads a ``--metrics`` endpoint as Prometheus would, into
  ``{'name{label="value"}': value}``; :func:`total` adds up a metric's series.
- :class:`Prometheus` runs Debian's ``prometheus`` on loopback, scraping one target every
  second into a temporary store, and answers PromQL through its HTTP API (:meth:`query`).

Everything on loopback, ports chosen at run time; no pytest here.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dot_proxy.testing.realdns import LOOPBACK, RealDnsError, _require_tool, _Server, free_port

__all__ = ["Prometheus", "http_get", "parse_metrics", "scrape", "total"]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url``: its status and body (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def parse_metrics(text: str) -> dict[str, float]:
    """The text exposition format as ``'name{label="value",...}'`` (labels sorted) → value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(port: int, host: str = LOOPBACK) -> dict[str, float]:
    """GET /metrics from a dot-proxy ``--metrics`` endpoint, parsed (see parse_metrics)."""
    status, body = http_get(f"http://{host}:{port}/metrics")
    if status != 200:
        raise RealDnsError(f"/metrics answered {status}: {body}")
    return parse_metrics(body)


def total(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s series in ``metrics`` that carry ``labels``."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    found = 0.0
    for series, value in metrics.items():
        ours = series == name or series.startswith(name + "{")
        if ours and all(label in series for label in wanted):
            found += value
    return found


class Prometheus(_Server):
    """``prometheus`` scraping ``target`` (``HOST:PORT``) every second, job ``dot-proxy``."""

    name = "prometheus"

    def __init__(
        self, target: str, *, workdir: Path | str | None = None, attempts: int = 3
    ) -> None:
        super().__init__(workdir=workdir, attempts=attempts)
        self.target = target
        self.port = 0
        self.config_file = self.workdir / "prometheus.yml"

    def _prepare(self) -> list[str]:
        self.port = free_port("tcp")
        self.config_file.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: dot-proxy\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n"
        )
        return [
            _require_tool("prometheus"),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]

    def _probe(self) -> None:
        status, body = http_get(f"http://{LOOPBACK}:{self.port}/-/ready", timeout=1.0)
        if status != 200:
            raise RealDnsError(f"not ready: {status} {body}")

    def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """An instant PromQL query: each result's labels and value."""
        url = f"http://{LOOPBACK}:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}
        )
        status, body = http_get(url)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise RealDnsError(f"query {expression!r}: {status} {body}")
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]
