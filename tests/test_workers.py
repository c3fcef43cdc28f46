"""``--workers N``: N processes on one port, supervised by the one that started them.

Run as subprocesses, as users run them. The upstream is a bound, non-listening port, so every
query is answered SERVFAIL at once: enough to see which worker answered (debug lines carry
the process id) without any TLS. What is checked: the workers share UDP and TCP on one port
and each answers; SIGTERM or SIGINT stops them all with exit 0, each saying so; a worker that
dies on its own is restarted on the same sockets, and only crashes that keep coming stop the
proxy with exit 1 (for its own supervisor to see); workers whose supervisor was killed stop
by themselves.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from dot_proxy.cli import build_config
from dot_proxy.cpus import usable_cores
from dot_proxy.errors import ConfigError
from dot_proxy.serve.sockets import bind_worker_sockets
from dot_proxy.workers import PARENT_CHECK_INTERVAL, CrashPolicy, _Supervisor
from tests.processes import wait_until
from tests.test_cli import HANG_GUARD, Proxy, udp_servfail


@pytest.fixture
def refusing_upstream() -> Iterator[str]:
    """An upstream spec whose port is bound but not listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{closed.getsockname()[1]}#dns.test"


@pytest.fixture
def two_workers(refusing_upstream: str) -> Iterator[tuple[Proxy, int]]:
    proxy = Proxy(
        *("--listen", "127.0.0.1", "--port", "0", "--workers", "2"),
        *("--upstream", refusing_upstream, "--log-level", "debug"),
    )
    try:
        yield proxy, proxy.wait_for_port()
    finally:
        proxy.kill()
        for pid in children_of(proxy.process.pid):
            os.kill(pid, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie nobody reaped has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def tcp_servfail(port: int) -> None:
    request = dns.message.make_query("example.com.", "A").to_wire()
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as client:
        client.sendall(struct.pack("!H", len(request)) + request)
        length = struct.unpack("!H", client.recv(2, socket.MSG_WAITALL))[0]
        answer = dns.message.from_wire(client.recv(length, socket.MSG_WAITALL))
    assert answer.rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_workers_share_the_port_each_answers_and_a_signal_stops_all(
    two_workers: tuple[Proxy, int], signum: int
) -> None:
    proxy, port = two_workers
    workers = children_of(proxy.process.pid)
    assert len(workers) == 2
    # Each query from a socket of its own: the kernel spreads clients by address and port.
    for _ in range(40):
        udp_servfail(port)
    for _ in range(10):
        tcp_servfail(port)
    # To the supervisor alone (as from kill or systemd): it passes the stop on.
    proxy.process.send_signal(signum)
    assert proxy.finish() == 0
    assert not any(running(pid) for pid in workers)
    text = "".join(proxy.stderr)
    assert "Traceback" not in text, text
    assert "started 2 workers" in text
    for number, pid in enumerate(workers):
        assert f"[{pid}] dot_proxy.workers: worker {number} (pid {pid}) stopped" in text, text
    # Debug lines name their process: both workers answered queries.
    answered_by = set(re.findall(r"\[(\d+)\] dot_proxy\.\w+: upstream failed", text))
    assert answered_by == {str(pid) for pid in workers}


def replacement_of(proxy: Proxy, dead: int, others: set[int]) -> int:
    """Wait for the supervisor to fork the worker that replaces ``dead``; its pid."""
    found: list[int] = []

    def restarted() -> bool:
        found[:] = [pid for pid in children_of(proxy.process.pid) if pid not in others | {dead}]
        return bool(found) and running(found[0])

    wait_until(restarted, f"worker {dead} was not replaced")
    return found[0]


def test_a_worker_that_dies_is_restarted_on_the_same_sockets(
    two_workers: tuple[Proxy, int],
) -> None:
    proxy, port = two_workers
    dead, survivor = children_of(proxy.process.pid)
    os.kill(dead, signal.SIGKILL)
    new = replacement_of(proxy, dead, {survivor})
    assert running(survivor)
    # The port never closed: the supervisor kept the dead worker's sockets for the new one,
    # and the kernel still spreads clients across both sets.
    wait_until(lambda: _answered_by(proxy, new, port), "the new worker answered nothing")
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.finish() == 0
    text = "".join(proxy.stderr)
    assert f"worker 0 (pid {dead}) was killed by SIGKILL; restarting it in 0.1 s" in text, text
    assert f"worker 0 restarted (pid {new})" in text
    assert f"worker 0 (pid {new}) stopped" in text
    assert f"worker 1 (pid {survivor}) stopped" in text
    assert "Traceback" not in text, text


def _answered_by(proxy: Proxy, pid: int, port: int) -> bool:
    for _ in range(10):
        udp_servfail(port)
        tcp_servfail(port)
    proxy.read_available()
    return any(f"[{pid}] dot_proxy.handler: upstream failed" in line for line in proxy.stderr)


def test_sighup_to_the_supervisor_reaches_every_worker(
    refusing_upstream: str, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.1.10 printer.lan\n")
    proxy = Proxy(
        *("--listen", "127.0.0.1", "--port", "0", "--workers", "2"),
        *("--upstream", refusing_upstream, "--hosts", str(hosts)),
    )
    try:
        proxy.wait_for_port()
        workers = children_of(proxy.process.pid)
        assert len(workers) == 2

        def logged(text: str) -> bool:
            proxy.read_available()
            lines = "".join(proxy.stderr)
            return all(f"[{pid}] dot_proxy{text}" in lines for pid in workers)

        # Each worker takes SIGHUP once it serves (until then it ignores it).
        wait_until(lambda: logged(".serve.server: listening on tcp"), "a worker did not start")
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: logged(f".routing: hosts file {hosts} re-read"), "no re-read")
        assert logged(": SIGHUP: re-reading the hosts file")
        assert all(running(pid) for pid in workers)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.finish() == 0
    finally:
        proxy.kill()
    assert "Traceback" not in "".join(proxy.stderr)


def test_crashes_that_keep_coming_stop_the_proxy_with_exit_1(
    two_workers: tuple[Proxy, int],
) -> None:
    proxy, _ = two_workers
    victim, survivor = children_of(proxy.process.pid)
    limit = CrashPolicy().limit
    for _ in range(limit - 1):
        os.kill(victim, signal.SIGKILL)
        victim = replacement_of(proxy, victim, {survivor})
    os.kill(victim, signal.SIGKILL)
    assert proxy.finish() == 1
    assert not running(survivor)
    text = "".join(proxy.stderr)
    assert text.count("restarting it in") == limit - 1
    assert "restarting it in 0.8 s" in text  # the backoff doubled: 0.1, 0.2, 0.4, 0.8
    assert f"was killed by SIGKILL: {limit} crashes within 30 s; stopping the others" in text
    assert "Traceback" not in text, text


@pytest.mark.parametrize(
    ("crash_times", "now", "delay"),
    [
        ([], 100.0, 0.1),
        ([99.0], 100.0, 0.2),
        ([98.0, 99.0, 99.5], 100.0, 0.8),
        ([97.0, 98.0, 99.0, 99.5], 100.0, None),  # the fifth within 30 s: give up
        ([10.0, 20.0, 30.0, 40.0], 100.0, 0.1),  # old crashes are forgotten
        ([60.0, 98.0, 99.0, 99.5], 100.0, 0.8),  # 40 s ago is outside the window
    ],
)
def test_crash_policy_backs_off_and_gives_up(
    crash_times: list[float], now: float, delay: float | None
) -> None:
    crashes = list(crash_times)
    assert CrashPolicy().restart_delay(crashes, now) == delay
    assert crashes[-1] == now
    assert all(now - when < 30.0 for when in crashes)


def test_crash_policy_delay_has_a_ceiling() -> None:
    policy = CrashPolicy(limit=100, first_delay=1.0, max_delay=5.0)
    crashes: list[float] = []
    delays = [policy.restart_delay(crashes, float(second)) for second in range(6)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_workers_stop_by_themselves_when_their_supervisor_is_killed(
    two_workers: tuple[Proxy, int],
) -> None:
    proxy, _ = two_workers
    workers = children_of(proxy.process.pid)
    proxy.process.kill()
    proxy.process.wait()
    # Within a check interval or so; the bound is a hang guard, not a speed assertion.
    wait_until(lambda: not any(running(pid) for pid in workers), "workers outlived the kill")
    assert PARENT_CHECK_INTERVAL < HANG_GUARD


@pytest.mark.parametrize("value", ["0", "-1", "two", "257"])
def test_bad_worker_counts_are_config_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="--workers"):
        build_config(["--workers", value], {})


def test_workers_from_the_environment() -> None:
    assert build_config([], {"DOT_PROXY_WORKERS": "3"}).workers == 3
    assert build_config([], {}).workers == 1


def test_auto_workers_is_one_per_core_this_process_may_use() -> None:
    expected = usable_cores()  # its CPU set within its CPU quota: tests/test_cpus.py
    assert 1 <= expected <= len(os.sched_getaffinity(0))
    assert build_config(["--workers", "auto"], {}).workers == expected
    assert build_config([], {"DOT_PROXY_WORKERS": "AUTO"}).workers == expected


def test_without_so_reuseport_several_workers_are_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    config = build_config(["--listen", "127.0.0.1", "--port", "0", "--workers", "2"], {})
    with pytest.raises(ConfigError, match="--workers: this system has no SO_REUSEPORT"):
        bind_worker_sockets(config)


def test_worker_socket_sets_share_one_port() -> None:
    config = build_config(["--listen", "127.0.0.1", "--port", "0", "--workers", "3"], {})
    sets = bind_worker_sockets(config)
    try:
        assert len(sets) == 3
        ports = {sock.getsockname()[1] for sockets in sets for sock in sockets}
        assert len(ports) == 1
        kinds = sorted(sock.type for sock in sets[0])
        assert kinds == sorted([socket.SOCK_STREAM, socket.SOCK_DGRAM])
    finally:
        for sockets in sets:
            for sock in sockets:
                sock.close()


def processes_with_argument(marker: str) -> list[int]:
    """Live processes whose command line has ``marker`` as one argument."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in arguments and running(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2, 0.4])
def test_a_stop_while_starting_leaves_no_worker_behind(
    refusing_upstream: str, delay: float
) -> None:
    # SIGTERM at any moment of start-up (before, while or after forking): the proxy ends and
    # no worker outlives it. A network nobody uses in --allow marks this run's processes.
    marker = f"10.{random.randrange(256)}.{random.randrange(256)}.0/24"
    proxy = Proxy(
        *("--listen", "127.0.0.1", "--port", "0", "--workers", "3"),
        *("--upstream", refusing_upstream, "--allow", marker),
    )
    try:
        time.sleep(delay)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.finish() in (0, -signal.SIGTERM)  # killed outright before it could care
        wait_until(lambda: not processes_with_argument(marker), "a worker outlived the stop")
    finally:
        proxy.kill()
        for pid in processes_with_argument(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_supervisor_reports_a_stop_once_whatever_began_it() -> None:
    # on_stop is how the service manager hears STOPPING=1 (runner.py): once, when the workers
    # are first told to stop, by a signal or by crashes that keep coming.
    stops: list[str] = []
    by_signal = _Supervisor([], lambda *_: None, CrashPolicy(), on_stop=lambda: stops.append("x"))
    by_signal.stop_all()
    by_signal.stop_all()  # a second SIGTERM
    assert stops == ["x"]
    stops.clear()
    by_crashes = _Supervisor([], lambda *_: None, CrashPolicy(), on_stop=lambda: stops.append("x"))
    now = time.monotonic()
    by_crashes.crashes = [now - 0.4, now - 0.3, now - 0.2, now - 0.1]
    by_crashes.workers[4242] = 0
    by_crashes._ended(4242, -signal.SIGKILL)  # the fifth within the window
    assert (by_crashes.stopping, by_crashes.status, stops) == (True, 1, ["x"])
