"""Several upstreams through the whole proxy: failover, health, probes, policies, hedging.

Every test runs the proxy in-process with two or three fake DoT upstreams on loopback and asks
it over UDP, on virtual time (the ``clock`` fixture), so timings are exact to the
scheduler and nothing waits on the wall clock. Each fake answers with its own address, so the
answer says which upstream gave it. ``proxy.group`` is the upstream group the test's proxy
asks (``start_proxy`` hands it to ``serve``), to look at its health records.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing
import trustme

from dot_proxy.config import Config, parse_upstream
from dot_proxy.core.health import TIMEOUTS_TO_DOWN
from dot_proxy.upstream.group import HEDGE_FLOOR, HEDGER_RESOLUTION, PROBE_INTERVAL
from dot_proxy.upstream.race import Race
from tests.clients import query, udp_exchange
from tests.conftest import RunningProxy, StartProxy, StartUpstream
from tests.fakes import (
    AUTH_NAME,
    Behaviour,
    FakeUpstream,
    UpstreamConnection,
    answer_after,
    answer_for,
    answering,
    hang,
)

A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.3"
TIMEOUT = Config(upstreams=(parse_upstream("127.0.0.1#dns.test"),)).timeout  # the default
# "At once": waited on no timer at all. Virtual time moves only when every task waits on one,
# so anything that needs none takes (virtually) no time; 0.05 s leaves room for a clock jump
# or two of the hedger's 20 ms tick on a busy machine.
AT_ONCE = 0.05


# --- fakes ---------------------------------------------------------------------------------------


def from_address(address: str) -> Callable[[bytes], bytes]:
    return lambda query_wire: answer_for(query_wire, address=address)


def kind_of(query_wire: bytes) -> str:
    """The query name's first label without its digits: ``slow3.x.test.`` → ``slow``."""
    label = dns.message.from_wire(query_wire).question[0].name.labels[0].decode()
    return label.rstrip("0123456789")


def by_kind(address: str, delays: Mapping[str, float | None]) -> Behaviour:
    """Answer with ``address`` after ``delays[kind]`` seconds (0 when not listed; never when
    None), each query on its own timer."""

    async def behaviour(connection: UpstreamConnection) -> None:
        lock = trio.Lock()

        async def answer_later(query_wire: bytes, delay: float) -> None:
            await trio.sleep(delay)
            try:
                async with lock:
                    await connection.send(answer_for(query_wire, address=address))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            while (query_wire := await connection.receive_query()) is not None:
                delay = delays.get(kind_of(query_wire), 0.0)
                if delay is not None:
                    nursery.start_soon(answer_later, query_wire, delay)

    return behaviour


def soft_failure(rcode: dns.rcode.Rcode, tag: str) -> Callable[[bytes], bytes]:
    """An answer with ``rcode`` that carries ``tag`` in a TXT record of its additional
    section, so the test can tell the upstream's answer from one the proxy made up."""

    def make(query_wire: bytes) -> bytes:
        response = dns.message.make_response(dns.message.from_wire(query_wire))
        response.set_rcode(rcode)
        response.additional.append(dns.rrset.from_text("tag.test.", 0, "IN", "TXT", tag))
        wire: bytes = response.to_wire()
        return wire

    return make


class Refusing(FakeUpstream):
    """A fake that, while ``refusing``, closes each TCP connection at once, before TLS (a
    server that is down); otherwise it serves like any fake. ``connections`` counts both."""

    def __init__(self, ca: trustme.CA, *, behaviour: Behaviour, refusing: bool = True) -> None:
        super().__init__(ca, behaviour=behaviour)
        self.refusing = refusing
        self.refused = 0

    async def _handle(self, tcp: trio.SocketStream) -> None:
        if self.refusing:
            self.connections += 1
            self.refused += 1
            await trio.aclose_forcefully(tcp)
            return
        await super()._handle(tcp)


class SilentTls(FakeUpstream):
    """Accepts TCP and then never says a word: the TLS handshake hangs."""

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await trio.sleep_forever()
        finally:
            await trio.aclose_forcefully(tcp)


class ClosedPort:
    """A spec for a loopback port where nothing listens (bound, not listening: refused)."""

    def __init__(self, port: int) -> None:
        self.spec = f"127.0.0.1:{port}#{AUTH_NAME}"


@pytest.fixture
def closed_port() -> Iterator[ClosedPort]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield ClosedPort(sock.getsockname()[1])


async def start(nursery: trio.Nursery, fake: FakeUpstream) -> FakeUpstream:
    await nursery.start(fake.serve)
    return fake


# --- clients and checks --------------------------------------------------------------------------


def name(label: str) -> str:
    return f"{label}.resolver.test."


async def ask(proxy: RunningProxy, label: str) -> tuple[dns.message.Message, float]:
    """One query over UDP; the answer and how long (virtual seconds) it took."""
    request = query(name(label), "A")
    started = trio.current_time()
    answer = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    elapsed = trio.current_time() - started
    assert answer.id == request.id
    assert answer.question == request.question
    return answer, elapsed


def address(answer: dns.message.Message) -> str:
    """Which fake answered (its address), checking that the answer is a full NOERROR one."""
    assert answer.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(answer.rcode())
    return str(answer.answer[0][0].address)


async def address_of(proxy: RunningProxy, label: str) -> str:
    answer, _ = await ask(proxy, label)
    return address(answer)


def took(elapsed: float, at: float) -> bool:
    """Whether an answer that took ``elapsed`` came at ``at`` (not before, at once after; the
    1e-9 is for float sums of virtual time)."""
    return at - 1e-9 <= elapsed < at + AT_ONCE


def names_asked(fake: FakeUpstream) -> list[str]:
    return [dns.message.from_wire(q).question[0].name.to_text() for q in fake.queries]


async def poll(predicate: Callable[[], bool], *, step: float = 0.02, within: float = 30.0) -> None:
    """Wait in virtual time until ``predicate()`` holds, looking every ``step`` seconds (a
    coarser step than :func:`tests.fakes.eventually`: waits here span seconds)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - health records have no event to wait on
            await trio.sleep(step)


def all_tasks() -> list[trio.lowlevel.Task]:
    tasks: list[trio.lowlevel.Task] = []

    def walk(task: trio.lowlevel.Task) -> None:
        tasks.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return tasks


# --- failover and health -------------------------------------------------------------------------


async def test_a_refused_first_upstream_fails_over_to_the_second_at_once(
    clock: trio.testing.MockClock,
    closed_port: ClosedPort,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([closed_port, second])
    answer, elapsed = await ask(proxy, "first")
    assert address(answer) == B
    assert elapsed < AT_ONCE
    resolver = proxy.group
    assert resolver.health[0].down
    assert not resolver.health[1].down
    assert proxy.stats.servfail == 0


async def test_a_failed_upstream_is_skipped_probed_and_comes_back(
    clock: trio.testing.MockClock,
    ca: trustme.CA,
    nursery: trio.Nursery,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    first = Refusing(ca, behaviour=answering(from_address(A)))
    await start(nursery, first)
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second])
    resolver = proxy.group
    health = resolver.health[0]

    # The first refuses: the client is answered by the second at once, and the first is down.
    answer, elapsed = await ask(proxy, "q0")
    assert address(answer) == B
    assert elapsed < AT_ONCE
    assert first.connections == 1
    assert health.down
    assert health.backoff == 1.0
    failed_at = health.last_failure

    # Client queries no longer go to it, not even to find out whether it is back: nothing
    # reaches its port until the probe is due, 1 s after the failure.
    for index in range(1, 8):
        assert await address_of(proxy, f"q{index}") == B
    await trio.sleep_until(failed_at + 0.99)
    assert first.connections == 1

    # The background probe: due at 1 s, sent within a prober tick of that. It fails (still
    # refusing), so the backoff doubles.
    await poll(lambda: first.connections == 2, step=0.01)
    assert failed_at + 1.0 <= trio.current_time() <= failed_at + 1.0 + PROBE_INTERVAL + 0.02
    await poll(lambda: health.backoff == 2.0)
    probe_failed_at = health.last_failure
    assert health.down
    assert await address_of(proxy, "q8") == B
    assert first.connections == 2

    # It comes back: the next probe, 2 s after the last failure, finds it answering.
    first.refusing = False
    await poll(lambda: not health.down)
    assert trio.current_time() <= probe_failed_at + 2.0 + PROBE_INTERVAL + 0.05
    assert names_asked(first) == ["."]  # the probe's ". NS", and no client query
    assert health.backoff == 0.0

    # Traffic returns to it under failover, on the connection the probe opened.
    second_queries = len(second.queries)
    for index in range(9, 14):
        assert await address_of(proxy, f"q{index}") == A
    assert len(second.queries) == second_queries
    assert first.handshakes == 1
    assert names_asked(first)[1:] == [name(f"q{index}") for index in range(9, 14)]


async def test_all_down_the_client_is_answered_as_soon_as_one_works(
    clock: trio.testing.MockClock,
    ca: trustme.CA,
    nursery: trio.Nursery,
    start_proxy: StartProxy,
) -> None:
    first = Refusing(ca, behaviour=answering(from_address(A)))
    second = Refusing(ca, behaviour=answering(from_address(B)))
    await start(nursery, first)
    await start(nursery, second)
    proxy = await start_proxy([first, second])
    resolver = proxy.group

    # Both refuse: SERVFAIL, promptly (not at the deadline).
    request = query(name("none"), "A")
    started = trio.current_time()
    reply = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert trio.current_time() - started < AT_ONCE
    assert all(health.down for health in resolver.health)

    # They stay down for a while; probes fail and the backoffs grow.
    await trio.sleep(20.0)
    assert all(health.down for health in resolver.health)
    assert all(health.backoff >= 8.0 for health in resolver.health)
    next_probes = [health.next_probe for health in resolver.health]

    # One comes back. The next client query is answered by it at once: down upstreams are
    # still tried as a last resort, rather than SERVFAIL until a probe, seconds away, finds it.
    second.refusing = False
    answer, elapsed = await ask(proxy, "back")
    assert address(answer) == B
    assert elapsed < AT_ONCE
    assert trio.current_time() < min(next_probes) - 1.0
    assert not resolver.health[1].down
    assert resolver.health[0].down


async def test_a_hedge_never_goes_to_a_down_upstream(
    clock: trio.testing.MockClock,
    ca: trustme.CA,
    nursery: trio.Nursery,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    # The issue: a hedge goes to "the next healthy upstream". A down one is left to the
    # prober and its backoff; client queries that are merely slow must not hammer it.
    first = Refusing(ca, behaviour=answering(from_address(A)))
    await start(nursery, first)
    second = await start_upstream(by_kind(B, {"slow": 0.2}))  # past the 0.1 s floor
    proxy = await start_proxy([first, second])
    resolver = proxy.group
    assert await address_of(proxy, "warm") == B  # the first fails; the second answers
    assert resolver.health[0].down
    assert first.connections == 1
    for index in range(3):
        answer, elapsed = await ask(proxy, f"slow{index}")
        assert address(answer) == B
        assert took(elapsed, 0.2)
    assert trio.current_time() < resolver.health[0].next_probe  # no probe yet either
    assert first.connections == 1
    assert resolver.health[0].backoff == 1.0


# --- policies ------------------------------------------------------------------------------------


async def test_round_robin_spreads_queries_across_upstreams(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fakes = [await start_upstream(answering(from_address(a))) for a in (A, B, C)]
    proxy = await start_proxy(fakes, upstream_policy="round-robin", hedge_after=0)
    answered_by = [await address_of(proxy, f"rr{index}") for index in range(12)]
    for start_at in range(0, 12, 3):
        assert sorted(answered_by[start_at : start_at + 3]) == [A, B, C]
    assert [len(fake.queries) for fake in fakes] == [4, 4, 4]


async def test_failover_sends_everything_to_the_first_healthy_upstream(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    fakes = [await start_upstream(answering(from_address(a))) for a in (A, B, C)]
    proxy = await start_proxy(fakes, upstream_policy="failover")
    assert [await address_of(proxy, f"fo{index}") for index in range(6)] == [A] * 6
    assert [fake.connections for fake in fakes] == [1, 0, 0]


async def test_fastest_prefers_the_lower_latency_upstream(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    slow = await start_upstream(answer_after(0.1, from_address(A)))
    fast = await start_upstream(answer_after(0.01, from_address(B)))
    proxy = await start_proxy([slow, fast], upstream_policy="fastest", hedge_after=0)
    answered_by = [await address_of(proxy, f"fast{index}") for index in range(40)]
    # Each is measured first (unmeasured upstreams are tried first) ...
    assert answered_by[:2] == [A, B]
    # ... then, weighted 1/rtt² (100 against 10000), the fast one gets nearly every query.
    assert answered_by.count(B) >= 30
    resolver = proxy.group
    assert resolver.health[0].rtt == pytest.approx(0.1, abs=0.01)
    assert resolver.health[1].rtt == pytest.approx(0.01, abs=0.005)


# --- hedging -------------------------------------------------------------------------------------


async def test_a_race_wakes_every_task_waiting_on_it_every_time() -> None:
    # A hedged query has two tasks waiting on one race: the query's own (for the first
    # upstream) and the hedge (for the second). Whichever runs first after a wake must not
    # leave the other asleep on an event nobody will set.
    race = Race()
    rounds = 20
    woken = {"query": 0, "hedge": 0}

    async def waiter(who: str) -> None:
        for _ in range(rounds):
            await race.wait()
            woken[who] += 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for who in woken:
                nursery.start_soon(waiter, who)
            for count in range(1, rounds + 1):
                await trio.testing.wait_all_tasks_blocked()
                race.wake()
                await trio.testing.wait_all_tasks_blocked()
                assert woken == {"query": count, "hedge": count}


@pytest.mark.parametrize(
    ("hedge_after", "answer_at", "answered_by"),
    [
        pytest.param(None, HEDGE_FLOOR, B, id="auto-floor"),
        pytest.param(0.5, 0.5, B, id="fixed-0.5"),
        # Off: one query, on a fresh connection (on one that has answered before, 1 s of
        # silence with a query out retires it as stale: see Config.stall_timeout).
        pytest.param(0, 2.0, A, id="off"),
    ],
)
async def test_hedge_after_decides_when_the_second_upstream_is_asked_too(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    hedge_after: float | None,
    answer_at: float,
    answered_by: str,
) -> None:
    first = await start_upstream(answer_after(2.0, from_address(A)))
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second], hedge_after=hedge_after)
    # Several queries, one after another: each is its own race, and each must end at once
    # when its winner answers.
    for index in range(8 if answered_by == B else 1):
        answer, elapsed = await ask(proxy, f"slow{index}")
        assert address(answer) == answered_by
        # Three races lost in a row mark the first down (as three timeouts would): from
        # then on queries go straight to the second until a probe finds the first again.
        assert took(elapsed, answer_at if index < TIMEOUTS_TO_DOWN else 0.0)
    if answered_by == A:
        assert second.connections == 0
    assert proxy.stats.servfail == 0


async def test_under_load_hedges_due_close_together_start_together(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    # Twenty slow queries, 1 ms apart: waking the hedger once per query cost ~10 µs of CPU
    # each under load. Hedges due within the hedger's resolution start in one wake-up, and
    # none starts before its budget or more than the resolution after it.
    first = await start_upstream(by_kind(A, {"slow": 2.0}))
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second])  # hedge_after: auto
    assert await address_of(proxy, "fast") == A
    answered_at: list[float] = []

    async def slow(index: int) -> None:
        await trio.sleep(index * 0.001)
        asked_at = trio.current_time()
        answer, elapsed = await ask(proxy, f"slow{index}")
        assert address(answer) == B
        assert HEDGE_FLOOR - 1e-9 <= elapsed <= HEDGE_FLOOR + HEDGER_RESOLUTION + 1e-9
        answered_at.append(asked_at + elapsed)

    async with trio.open_nursery() as clients:
        for index in range(20):
            clients.start_soon(slow, index)
    # 20 ms of hedges: a handful of wake-ups (four at 5 ms resolution), not twenty.
    wake_ups = {round(at, 6) for at in answered_at}
    assert len(wake_ups) <= 0.020 / HEDGER_RESOLUTION + 1 < 10


async def test_a_hedged_query_is_abandoned_without_harm_to_its_connection(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    # The first answers "slow" names after 2 s, "other" after 0.5 s and the rest at once; the
    # second answers "slow" at once and never answers "other".
    first = await start_upstream(by_kind(A, {"slow": 2.0, "other": 0.5}))
    second = await start_upstream(by_kind(B, {"other": None}))
    proxy = await start_proxy([first, second])  # hedge_after: auto
    resolver = proxy.group
    assert await address_of(proxy, "fast0") == A  # the first's connection is open

    other: dict[str, object] = {}

    async def ask_other() -> None:
        other["answer"], other["elapsed"] = await ask(proxy, "other")

    async with trio.open_nursery() as clients:
        clients.start_soon(ask_other)
        await first.wait_for_queries(2)
        # Slow queries, hedged after the floor and answered by the second, while "other"
        # is in flight on the first's connection. Fast ones keep that connection busy (a
        # real resolver answers other clients meanwhile).
        for index in range(10):
            answer, elapsed = await ask(proxy, f"slow{index}")
            assert address(answer) == B
            assert took(elapsed, HEDGE_FLOOR)
            assert await address_of(proxy, f"fast{index + 1}") == A
    # "other" was on the same connection as the abandoned queries: answered by the first, on
    # its own time, as if nothing had happened.
    assert address(other["answer"]) == A  # type: ignore[arg-type]
    assert other["elapsed"] == pytest.approx(0.5, abs=AT_ONCE)

    # The abandoned queries' answers come back after 2 s and are dropped quietly; the
    # connection serves on. No new handshake, no failure counted.
    until = trio.current_time() + 2.5
    index = 100
    while trio.current_time() < until:
        assert await address_of(proxy, f"fast{index}") == A
        index += 1
        await trio.sleep(0.3)
    assert len([n for n in names_asked(first) if n.startswith("slow")]) == 10
    assert first.handshakes == 1
    assert first.connections == 1
    [connection] = resolver.upstreams[0].connections
    assert connection.in_flight == 0  # every abandoned ID was freed by its late answer
    assert not resolver.health[0].down
    assert resolver.health[0].failures == 0
    assert proxy.stats.servfail == 0


async def test_the_budget_is_learnt_from_the_first_upstreams_own_latency(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # The first answers "usual" names after 0.25 s (its p95); the second never answers them.
    first = await start_upstream(by_kind(A, {"usual": 0.25, "slow": 2.0}))
    second = await start_upstream(by_kind(B, {"usual": None}))
    proxy = await start_proxy([first, second])
    for index in range(4):
        answer, elapsed = await ask(proxy, f"usual{index}")
        assert address(answer) == A
        assert elapsed == pytest.approx(0.25, abs=AT_ONCE)
    # Now a slow one: the hedge waits the first's p95, 0.25 s, not the 0.1 s floor.
    answer, elapsed = await ask(proxy, "slow")
    assert address(answer) == B
    assert took(elapsed, 0.25)


async def test_a_hanging_tls_handshake_is_hedged_not_waited_out(
    clock: trio.testing.MockClock,
    ca: trustme.CA,
    nursery: trio.Nursery,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    first = SilentTls(ca)
    await start(nursery, first)
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second])
    connect_timeout = proxy.config.connect_timeout
    assert connect_timeout > 1.0
    started = trio.current_time()
    for index in range(8):
        answer, elapsed = await ask(proxy, f"tls{index}")
        assert address(answer) == B
        assert took(elapsed, HEDGE_FLOOR if index < TIMEOUTS_TO_DOWN else 0.0)
    assert first.connections >= 1
    assert trio.current_time() - started < connect_timeout


async def test_a_query_waiting_for_room_on_a_hung_upstream_is_answered_by_the_hedge(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # A hung first upstream (TLS up, no answers) fills its pool with abandoned queries; the
    # next queries wait for room in it. Their hedges answer; they must not wait on for room
    # until the deadline. Small limits make the pool full after two queries instead of 512.
    first = await start_upstream(hang)
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second], max_connections=1, max_pipeline=2)
    answers: dict[str, tuple[dns.message.Message, float]] = {}

    async def client(label: str) -> None:
        answers[label] = await ask(proxy, label)

    async with trio.open_nursery() as clients:
        for index in range(5):
            clients.start_soon(client, f"full{index}")
    assert len(first.queries) == 2  # the pool's room: one connection, two in flight
    for label, (answer, elapsed) in sorted(answers.items()):
        assert address(answer) == B, label
        assert took(elapsed, HEDGE_FLOOR), label
    assert proxy.stats.servfail == 0


async def test_a_hung_first_upstream_stops_costing_every_query_the_hedge_budget(
    clock: trio.testing.MockClock, start_upstream: StartUpstream, start_proxy: StartProxy
) -> None:
    # The first completes TLS and then never answers (a wedged resolver). Hedging hides it
    # from clients, at 0.1 s a query; health should notice it, as it notices three timeouts
    # in a row with hedging off, and send queries straight to the second.
    first = await start_upstream(hang)
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second])
    latencies = []
    for index in range(30):
        answer, elapsed = await ask(proxy, f"wedged{index}")
        assert address(answer) == B
        latencies.append(elapsed)
        await trio.sleep(0.5)
    assert all(elapsed < AT_ONCE for elapsed in latencies[-5:]), latencies


# --- soft failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED], ids=["servfail", "refused"]
)
async def test_a_soft_failure_is_retried_on_the_next_upstream(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    rcode: dns.rcode.Rcode,
) -> None:
    first = await start_upstream(answering(soft_failure(rcode, "first")))
    second = await start_upstream(answering(from_address(B)))
    proxy = await start_proxy([first, second])
    resolver = proxy.group
    for index in range(6):
        answer, elapsed = await ask(proxy, f"soft{index}")
        assert address(answer) == B
        assert elapsed < AT_ONCE
    # Each query went to the first again: an answer, even SERVFAIL, shows it alive, so it
    # is not marked down (more than the three failures that would mark it).
    assert len(first.queries) == 6
    assert not resolver.health[0].down
    assert resolver.health[0].consecutive_failures == 0
    assert resolver.health[0].soft_failures == 6


@pytest.mark.parametrize(
    ("rcodes", "expected_rcode", "expected_tag"),
    [
        pytest.param(
            (dns.rcode.SERVFAIL, dns.rcode.SERVFAIL), dns.rcode.SERVFAIL, "second", id="servfail"
        ),
        pytest.param(
            (dns.rcode.SERVFAIL, dns.rcode.REFUSED), dns.rcode.REFUSED, "second", id="mixed"
        ),
    ],
)
async def test_when_every_upstream_fails_softly_the_last_answer_is_passed_on(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
    rcodes: tuple[dns.rcode.Rcode, dns.rcode.Rcode],
    expected_rcode: dns.rcode.Rcode,
    expected_tag: str,
) -> None:
    first = await start_upstream(answering(soft_failure(rcodes[0], "first")))
    second = await start_upstream(answering(soft_failure(rcodes[1], "second")))
    proxy = await start_proxy([first, second])
    resolver = proxy.group
    for index in range(4):
        answer, elapsed = await ask(proxy, f"bad{index}")
        assert answer.rcode() == expected_rcode
        assert elapsed < AT_ONCE
        # The upstream's own answer, not one the proxy made up.
        tag = answer.find_rrset(
            answer.additional, dns.name.from_text("tag.test."), dns.rdataclass.IN, dns.rdatatype.TXT
        )
        assert str(tag[0]).strip('"') == expected_tag
    assert proxy.stats.servfail == 0
    assert len(first.queries) == len(second.queries) == 4
    assert not any(health.down for health in resolver.health)


# --- the deadline --------------------------------------------------------------------------------


async def test_every_upstream_hanging_gives_servfail_at_the_deadline_and_leaks_nothing(
    clock: trio.testing.MockClock,
    start_upstream: StartUpstream,
    start_proxy: StartProxy,
) -> None:
    fakes = [await start_upstream(hang) for _ in range(3)]
    proxy = await start_proxy(fakes, timeout=TIMEOUT)
    resolver = proxy.group
    await trio.testing.wait_all_tasks_blocked()
    baseline = len(all_tasks())

    request = query(name("hang"), "A")
    started = trio.current_time()
    reply = dns.message.from_wire(await udp_exchange(proxy.port, request.to_wire()))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.id == request.id
    assert trio.current_time() - started == pytest.approx(TIMEOUT, abs=AT_ONCE)
    assert proxy.stats.timeouts == 1
    # The query was hedged once, to the second upstream; the third was never asked ...
    assert [len(fake.queries) for fake in fakes] == [1, 1, 0]
    # ... and one timeout does not mark an upstream down (three in a row do).
    assert not any(health.down for health in resolver.health)

    # Afterwards nothing is left over: every upstream connection is closed once the queries
    # on it are given up on, and every task the query started has ended.
    await poll(lambda: not any(u.connections for u in resolver.upstreams), step=0.1)
    await poll(lambda: len(all_tasks()) == baseline, step=0.1, within=5.0)
