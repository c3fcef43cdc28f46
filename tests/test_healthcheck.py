"""``dot-proxy healthcheck``: the proxy answers it itself, whatever its upstreams do."""

from __future__ import annotations

import functools

import dns.message
import dns.opcode
import dns.rcode
import pytest
import trio
import trio.testing

from dot_proxy.cli import main
from dot_proxy.config import Config, parse_upstream
from dot_proxy.healthcheck import run_healthcheck, status_query, target_host
from dot_proxy.serve.server import serve

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
    with (
        trio.socket.socket(type=trio.socket.SOCK_DGRAM) as udp,
        trio.socket.socket() as tcp,
    ):
        await udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        await tcp.bind(("127.0.0.1", port))
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
