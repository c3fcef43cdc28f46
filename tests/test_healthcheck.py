"""``dot-proxy healthcheck``: the proxy answers it itself, whatever its upstreams do; with
``--metrics`` (flag, variable or config file) the endpoint's /healthz must say 200 too."""

from __future__ import annotations

import functools
from pathlib import Path

import dns.message
import dns.opcode
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy.cli import main
from dot_proxy.config import Config, parse_upstream
from dot_proxy.healthcheck import run_healthcheck, status_query, target_host
from dot_proxy.serve.ops_http import OpsEndpoints, bind_ops_socket, serve_ops
from dot_proxy.serve.server import serve
from dot_proxy.testing.realdns import bound_pair, closed_port, free_port
from tests.conftest import StartOpsProxy
from tests.processes import run_dot_proxy

# An upstream nobody serves: the health check must not need one.
NOWHERE = "127.0.0.1:9#nowhere.test"


def test_the_query_is_a_status_request_dnspython_reads() -> None:
    message = dns.message.from_wire(status_query(0x1234))
    assert message.id == 0x1234
    assert message.opcode() == dns.opcode.STATUS
    assert str(message.question[0]) == ". IN NS"


@pytest.mark.parametrize(
    ("listen", "asked"),
    [(("0.0.0.0", "::"), "127.0.0.1"), (("::",), "::1"), (("192.0.2.7",), "192.0.2.7")],
)
def test_a_wildcard_is_asked_on_loopback(listen: tuple[str, ...], asked: str) -> None:
    assert target_host(listen) == asked


async def _check(nursery: trio.Nursery, *, allow: tuple[str, ...] | None = None) -> list[str]:
    config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=0)
    if allow is not None:
        config = Config(upstreams=config.upstreams, listen=config.listen, port=0, allow=allow)
    bound = await nursery.start(functools.partial(serve, config))
    port = bound[0][2]
    lines: list[str] = []
    status = await run_healthcheck(
        Config(upstreams=config.upstreams, listen=("0.0.0.0",), port=port), out=lines.append
    )
    nursery.cancel_scope.cancel()
    assert status == 0, lines
    return lines


async def test_healthy_over_udp_and_tcp_without_any_upstream(nursery: trio.Nursery) -> None:
    lines = await _check(nursery)
    assert [line.split(":", 1)[0].split()[0] for line in lines] == ["udp", "tcp"]
    assert all("answered NOTIMP" in line for line in lines), lines


async def test_a_refusal_is_an_answer_too(nursery: trio.Nursery) -> None:
    # Loopback outside --allow: REFUSED, which still shows the loops turn.
    lines = await _check(nursery, allow=("192.0.2.0/24",))
    assert all("answered REFUSED" in line for line in lines), lines


async def test_nothing_listening_is_unhealthy() -> None:
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as taken:
        await taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    lines: list[str] = []
    config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=port)
    assert await run_healthcheck(config, out=lines.append) == 1
    assert len(lines) == 2
    assert all("FAILED" in line for line in lines), lines


async def test_silence_is_unhealthy(autojump_clock: trio.testing.MockClock) -> None:
    # A UDP socket that reads nothing and a TCP listener that never accepts: a hung proxy.
    udp, tcp, port = bound_pair()
    with udp, tcp:
        tcp.listen(1)
        lines: list[str] = []
        config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=port)
        assert await run_healthcheck(config, out=lines.append) == 1
    assert lines[0].endswith("FAILED: no answer within 2 s"), lines


def test_a_bad_flag_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["healthcheck", "--port", "fifty-three"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("dot-proxy healthcheck: --port: ")


def _nowhere(port: int, metrics: tuple[str, int] | None) -> Config:
    return Config(
        upstreams=(parse_upstream(NOWHERE),), listen=("0.0.0.0",), port=port, metrics=metrics
    )


async def test_with_metrics_healthz_is_asked_too_a_wildcard_on_loopback(
    start_ops_proxy: StartOpsProxy,
) -> None:
    proxy = await start_ops_proxy(
        config=Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=0)
    )
    lines: list[str] = []
    config = _nowhere(proxy.port, ("0.0.0.0", proxy.http))
    assert await run_healthcheck(config, out=lines.append) == 0, lines
    assert [line.split()[0] for line in lines] == ["udp", "tcp", "http"]
    assert lines[2].startswith(f"http 127.0.0.1:{proxy.http}/healthz: answered 200 ok in "), lines


async def test_dns_answering_is_not_enough_when_healthz_says_503(nursery: trio.Nursery) -> None:
    # The serve loops answer, but the endpoint says the proxy is stopping: unhealthy.
    config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=0)
    bound = await nursery.start(functools.partial(serve, config))

    async def no_metrics() -> bytes:
        return b""

    stopping = OpsEndpoints(metrics=no_metrics, live=lambda: False, ready=lambda: False)
    http = (await nursery.start(serve_ops, bind_ops_socket(("127.0.0.1", 0)), stopping))[1]
    lines: list[str] = []
    status = await run_healthcheck(_nowhere(bound[0][2], ("127.0.0.1", http)), out=lines.append)
    nursery.cancel_scope.cancel()
    assert status == 1, lines
    assert all("answered NOTIMP" in line for line in lines[:2]), lines
    assert lines[2] == f"http 127.0.0.1:{http}/healthz: FAILED: answered 503 not serving"


async def test_no_endpoint_where_metrics_says_is_unhealthy(nursery: trio.Nursery) -> None:
    config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=0)
    bound = await nursery.start(functools.partial(serve, config))
    lines: list[str] = []
    with closed_port() as refusing:
        status = await run_healthcheck(
            _nowhere(bound[0][2], ("127.0.0.1", refusing)), out=lines.append
        )
    nursery.cancel_scope.cancel()
    assert status == 1, lines
    assert "FAILED" not in lines[0] + lines[1], lines
    assert lines[2].startswith("http 127.0.0.1:") and "FAILED" in lines[2], lines


async def test_a_silent_endpoint_fails_within_the_timeout(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    config = Config(upstreams=(parse_upstream(NOWHERE),), listen=("127.0.0.1",), port=0)
    bound = await nursery.start(functools.partial(serve, config))
    with trio.socket.socket() as silent:  # listening, never accepting: a hung endpoint
        await silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        metrics = ("127.0.0.1", silent.getsockname()[1])
        lines: list[str] = []
        started = trio.current_time()
        assert await run_healthcheck(_nowhere(bound[0][2], metrics), out=lines.append) == 1
        # The three questions go out together: 2 s in all, not 2 s each.
        assert trio.current_time() - started == pytest.approx(2.0)
    nursery.cancel_scope.cancel()
    assert "FAILED" not in lines[0] + lines[1], lines
    assert lines[2].endswith("/healthz: FAILED: no answer within 2 s"), lines


@pytest.mark.parametrize("source", ["flag", "variable", "file"])
def test_metrics_from_a_flag_a_variable_or_the_config_file(source: str, tmp_path: Path) -> None:
    # Nothing listens on either port: each question fails, and the third is the endpoint's.
    port, metrics = free_port("both"), "127.0.0.1:" + str(free_port("both"))
    args = ["healthcheck", "--listen", "127.0.0.1", "--port", str(port)]
    variables: dict[str, str] = {}
    if source == "flag":
        args += ["--metrics", metrics]
    elif source == "variable":
        variables["DOT_PROXY_METRICS"] = metrics
    else:
        path = tmp_path / "dot-proxy.toml"
        path.write_text(f'metrics = "{metrics}"\n')
        args += ["--config", str(path)]
    result = run_dot_proxy(*args, **variables)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["udp", "tcp", "http"], lines
    assert lines[2].startswith(f"http {metrics}/healthz: FAILED"), lines
