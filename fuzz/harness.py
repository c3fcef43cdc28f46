"""The whole query path in memory: client bytes → ``QueryHandler.answer`` → answer bytes.

Shared by the atheris target (``fuzz/fuzz_query_path.py``) and the corpus replay under pytest
(``tests/test_fuzz_corpus.py``); nothing here imports atheris.

What runs is the real stack: ``QueryHandler`` over a real ``UpstreamGroup`` (hedger and prober
running) over real ``Upstream`` pools and ``Connection`` objects. Only the byte pipe under a
connection is fake: ``dot_proxy.upstream.connection.open_tls`` is swapped, for the length of one
run, for a function that hands the connection one end of ``trio.testing.memory_stream_pair()`` and
serves the other end with a fake upstream that answers through dnspython (fuzz/fake_upstreams.py).
No TLS runs on that pipe: TLS is OpenSSL's and trio's byte layer, whose choices other tests pin down
(trustme over memory streams, tests/test_upstream_*.py); a handshake per input would cost most of
each run and find nothing in dot-proxy. Time is trio's ``MockClock`` with autojump, so a hanging
upstream reaches the five-second deadline at once.

An input is three control bytes, then the client's message (fuzz/cases.py);
fuzz/invariants.py says what must hold. :func:`run_input` runs one input and checks it.
"""

from __future__ import annotations

import queue
import random
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Final, Self, TypeVar
from unittest import mock

import outcome
import trio
import trio.testing

from dot_proxy.config import Config, UpstreamSpec
from dot_proxy.core.cache import AnswerCache
from dot_proxy.handler import QueryHandler, ServerStats
from dot_proxy.resolver import Resolver
from dot_proxy.upstream import connection as connection_module
from dot_proxy.upstream.group import UpstreamGroup
from dot_proxy.upstream.pool import Upstream
from fuzz.cases import CONTROL_SIZE, Case, decode, encode
from fuzz.fake_upstreams import FakeNetwork, Mode
from fuzz.invariants import TIMEOUT, InvariantViolation, Outcome, check

__all__ = [
    "CONTROL_SIZE",
    "Case",
    "InvariantViolation",
    "Mode",
    "Outcome",
    "QueryPath",
    "TrioPump",
    "check",
    "decode",
    "encode",
    "run_input",
]

# The whole run, shutdown included, in virtual time: a stack that does not wind down within
# this is a hang, reported as trio.TooSlowError.
RUN_GUARD: Final = 60.0


def _no_quickack(_stream: object) -> None:
    # TCP_QUICKACK needs a TCP socket; the fake pipe has none.
    return None


T = TypeVar("T")


class TrioPump:
    """One trio run kept across inputs, advanced only while an input runs (guest mode).

    ``trio.run`` per input costs about 0.3 ms of CPU to set up and tear down (an epoll
    instance, a wake-up socket pair, signal handling): as much as a malformed query's whole
    path. A guest run (``trio.lowlevel.start_guest_run``) pays that once; the host loop here
    is a queue drained only inside :meth:`run`, so between inputs trio does nothing and its
    ``MockClock`` stands still. Each input still gets its own nursery and stack.

    Resource handling: use as a context manager; leaving it cancels the run and waits for it.
    """

    def __init__(self) -> None:
        self._callbacks: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._done: outcome.Outcome[None] | None = None

    def __enter__(self) -> Self:
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=self._callbacks.put,
            done_callback=self._finished,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
        while self._nursery is None:
            self._step()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None and self._nursery is not None and self._done is None:
            self._token.run_sync_soon(self._nursery.cancel_scope.cancel)
            while self._done is None:
                self._callbacks.get()()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    def _finished(self, result: outcome.Outcome[None]) -> None:
        self._done = result

    def _step(self) -> None:
        if self._done is not None:
            self._done.unwrap()
            raise RuntimeError("the trio guest run ended")
        self._callbacks.get()()

    def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """``await fn(*args)`` in the kept run; its result, or raise what it raised."""
        if self._token is None or self._nursery is None:
            raise RuntimeError("use TrioPump as a context manager")
        results: list[outcome.Outcome[T]] = []

        async def capture() -> None:
            results.append(await outcome.acapture(fn, *args))

        self._token.run_sync_soon(self._nursery.start_soon, capture)
        while not results:
            self._step()
        return results[0].unwrap()


class QueryPath:
    """Runs inputs through the real stack; keeps what can be built once (configs, context).

    With a :class:`TrioPump` every input runs in that one trio run; without, each input gets
    its own ``trio.run`` (slower, and what the pytest replay uses).
    """

    def __init__(self, pump: TrioPump | None = None) -> None:
        self._pump = pump
        self._configs: dict[tuple[int, bool, str, float | None], Config] = {}
        # Never used to handshake (open_tls is swapped); Upstream only stores it.
        self._ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def config(self, case: Case) -> Config:
        """The proxy's configuration for ``case``, built once per distinct shape."""
        key = (len(case.modes), case.padding, case.policy, case.hedge_after)
        if key not in self._configs:
            self._configs[key] = Config(
                upstreams=tuple(
                    UpstreamSpec("127.0.0.1", 8530 + index, "dns.test")
                    for index in range(len(case.modes))
                ),
                timeout=TIMEOUT,
                padding=case.padding,
                upstream_policy=case.policy,
                hedge_after=case.hedge_after,
            )
        return self._configs[key]

    def run(self, case: Case) -> Outcome:
        """Answer ``case.message`` once, with a fresh stack."""
        config = self.config(case)
        if self._pump is not None:
            return self._pump.run(self._answer, case, config)
        clock = trio.testing.MockClock(autojump_threshold=0)
        return trio.run(self._answer, case, config, clock=clock)

    async def _answer(self, case: Case, config: Config) -> Outcome:
        stats = ServerStats()
        with trio.fail_after(RUN_GUARD):
            async with trio.open_nursery() as nursery:
                network = FakeNetwork(case.modes, nursery)
                network.ports = {spec.port: i for i, spec in enumerate(config.upstreams)}
                with _swapped_open_tls(network):
                    # What open_upstream_group builds, minus the real TLS contexts and sockets.
                    upstreams = [
                        Upstream(spec, self._ssl_context, config, nursery)
                        for spec in config.upstreams
                    ]
                    group = UpstreamGroup(upstreams, config, nursery, rng=random.Random(0))
                    nursery.start_soon(group.run_hedger)
                    nursery.start_soon(group.run_prober)
                    # The cache is on, as by default: every answer the fake upstreams make up
                    # goes through the cache's store too.
                    cache = AnswerCache(size=config.cache_size)
                    handler = QueryHandler(Resolver(group, config, nursery, cache), config, stats)
                    started = trio.current_time()
                    answer = await handler.answer_message(case.message, started, udp=case.udp)
                    elapsed = trio.current_time() - started
                    nursery.cancel_scope.cancel()
        return Outcome(answer, elapsed, stats, tuple(network.sent))


@contextmanager
def _swapped_open_tls(network: FakeNetwork) -> Iterator[None]:
    # Connection._connect and Connection.run look these names up in dot_proxy.upstream.connection at
    # call time: swapping them is the one seam needed to run the pool over memory streams.
    with (
        mock.patch.object(connection_module, "open_tls", network.open_tls),
        mock.patch.object(connection_module, "quickack_hook", _no_quickack),
    ):
        yield


def run_input(path: QueryPath, data: bytes) -> Outcome | None:
    """Decode, run and check one fuzz input; None when it is too short to be a case."""
    case = decode(data)
    if case is None:
        return None
    result = path.run(case)
    check(case, result)
    return result
