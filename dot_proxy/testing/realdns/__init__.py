"""Real DNS software as subprocesses, for end-to-end tests and the benchmark.

Everything here runs on loopback only, on ports chosen at run time:

- a trustme PKI (``make_pki``) for the name ``dns.test`` and the loopback addresses;
- a local zone ``test.`` (``Zone``, ``write_zone``, ``write_queries``);
- ``Unbound`` serving that zone over DoT (and plain DNS), the upstream of everything else;
- ``Stubby``, ``Dnsdist``, ``UnboundForwarder`` and ``DotProxy``: DoT forwarders to that
  unbound, each verifying its certificate against the trustme CA and the name ``dns.test``
  (dnsdist with or without its packet cache; the unbound forwarder caches);
- ``run_dnsperf``, query files (``write_queries``, ``write_cache_queries``) and ``/proc``
  sampling (``sample_process``) for the benchmark.

No pytest here: ``tests/e2e/conftest.py`` and ``bench/run_bench.py`` both import this package.
Each server class is a context manager; ``start()`` returns only once the server answers.

The package re-exports every name below, so ``realdns.X`` is all a caller needs. Its modules:

- ``tools``: the errors (``RealDnsError``, ``ToolMissingError``), ``LOOPBACK``, ``AUTH_NAME``
  and ``STARTUP_TIMEOUT``, finding programs (``find_tool``, ``missing_tools``,
  ``SYSTEM_TOOL_DIRS``), and ports (``free_port``, ``bound_pair``, ``closed_port``);
- ``pki``: the trustme CA and server certificate on disk (``Pki``, ``make_pki``);
- ``zone``: the zone ``test.`` (``Zone``, ``write_zone``) and the dnsperf query files drawn
  from it (``write_queries``, ``zone_questions``, ``write_cache_queries``);
- ``queries``: one query from dnspython (``udp_query``, ``tcp_query``, ``dot_query``);
- ``server``: ``_Server``, the life of a DNS program as a subprocess (start, probe, restart,
  stop), which every server class below builds on;
- ``unbound``: ``Unbound``, the DoT upstream serving the zone, and the ``unbound.conf``
  pieces it shares with ``UnboundForwarder``;
- ``forwarders``: ``Stubby``, ``Dnsdist``, ``UnboundForwarder`` and ``DotProxy`` (with
  ``dot_proxy_environment``);
- ``dnsperf``: ``run_dnsperf``, ``parse_dnsperf``, ``DnsperfResult`` and ``percentile``;
- ``process``: CPU and memory of a process tree from ``/proc`` (``sample_process``,
  ``cpu_us_per_query`` and the readings behind them).
"""

from __future__ import annotations

from dot_proxy.testing.realdns.dnsperf import (
    DnsperfMode,
    DnsperfResult,
    parse_dnsperf,
    percentile,
    run_dnsperf,
)
from dot_proxy.testing.realdns.forwarders import (
    Dnsdist,
    DotProxy,
    Stubby,
    UnboundForwarder,
    dot_proxy_environment,
)
from dot_proxy.testing.realdns.pki import Pki, make_pki
from dot_proxy.testing.realdns.process import (
    ProcSample,
    cpu_seconds,
    cpu_us_per_query,
    peak_rss_bytes,
    process_tree,
    rss_bytes,
    sample_process,
)
from dot_proxy.testing.realdns.queries import dot_query, tcp_query, udp_query
from dot_proxy.testing.realdns.server import _Server
from dot_proxy.testing.realdns.tools import (
    AUTH_NAME,
    LOOPBACK,
    STARTUP_TIMEOUT,
    SYSTEM_TOOL_DIRS,
    PortKind,
    RealDnsError,
    ToolMissingError,
    _require_tool,
    bound_pair,
    closed_port,
    find_tool,
    free_port,
    missing_tools,
)
from dot_proxy.testing.realdns.unbound import Unbound
from dot_proxy.testing.realdns.zone import (
    Zone,
    write_cache_queries,
    write_queries,
    write_zone,
    zone_questions,
)

# _Server and _require_tool are private to these helpers, but the helpers' siblings
# (testing/observability.py runs prometheus as a _Server) build on them.
__all__ = [
    "AUTH_NAME",
    "LOOPBACK",
    "STARTUP_TIMEOUT",
    "SYSTEM_TOOL_DIRS",
    "Dnsdist",
    "DnsperfMode",
    "DnsperfResult",
    "DotProxy",
    "Pki",
    "PortKind",
    "ProcSample",
    "RealDnsError",
    "Stubby",
    "ToolMissingError",
    "Unbound",
    "UnboundForwarder",
    "Zone",
    "_Server",
    "_require_tool",
    "bound_pair",
    "closed_port",
    "cpu_seconds",
    "cpu_us_per_query",
    "dot_proxy_environment",
    "dot_query",
    "find_tool",
    "free_port",
    "make_pki",
    "missing_tools",
    "parse_dnsperf",
    "peak_rss_bytes",
    "percentile",
    "process_tree",
    "rss_bytes",
    "run_dnsperf",
    "sample_process",
    "tcp_query",
    "udp_query",
    "write_cache_queries",
    "write_queries",
    "write_zone",
    "zone_questions",
]
