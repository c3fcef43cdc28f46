"""What the serve loop spends on one query before any task: ``QueryHandler.answer_at_once``.

    python bench/investigations/answer_at_once.py
    PYTHONPATH=OTHER_CHECKOUT python bench/investigations/answer_at_once.py   # another revision

timeit, no sockets and no upstream (the groups are stand-ins: nothing here reaches them), the
best of 7 repeats of 200,000 calls each, the cost of cycling through the inputs taken off:

- repeated hit: the same query bytes again (``Resolver.answer_repeated``, no parse);
- hit: one cached answer asked in 8,192 letter-case variants (0x20), more than the repeats
  memo holds, so each goes through ``parse_query`` and ``Resolver.answer_from_cache``;
- forward miss: 8,192 names under no zone, not cached: parse, cache look-up, the route (the
  router's quick turn-away), and the query handed back for a task;
- zone miss and local answer (revisions with split DNS): names under a ``--forward`` zone,
  and private reverse names answered here (``local_answer``).

Run it alone on a quiet machine, twice, and compare revisions in the same minute: on a shared
host a tenth of a microsecond is within the noise between runs.
"""

from __future__ import annotations

import importlib
import itertools
import timeit
from typing import Any

import dns.message
import dns.rrset
import trio

from dot_proxy.config import Config, parse_upstream
from dot_proxy.core.cache import AnswerCache, cache_key
from dot_proxy.core.message import HEADER_SIZE, parse_query
from dot_proxy.handler import QueryHandler, ServerStats
from dot_proxy.resolver import Resolver

CALLS = 200_000
REPEATS = 7
VARIANTS = 8192


def letter_cases(name: str, count: int) -> list[str]:
    """``count`` spellings of ``name`` in mixed case (as 0x20 clients write it)."""
    letters = [index for index, char in enumerate(name) if char.isalpha()]
    spellings = []
    for bits in range(count):
        chars = list(name)
        for bit, index in enumerate(letters):
            if bits >> bit & 1:
                chars[index] = chars[index].upper()
        spellings.append("".join(chars))
    return spellings


def queries(names: list[str], rdtype: str = "A") -> list[bytes]:
    return [dns.message.make_query(name, rdtype, id=0x1234).to_wire() for name in names]


def make_resolver(config: Config, nursery: trio.Nursery, cache: AnswerCache) -> tuple[Any, bool]:
    """The resolver, with a forward zone when this revision has split DNS."""
    stand_in: Any = object()
    try:
        routing = importlib.import_module("dot_proxy.routing")
    except ImportError:
        return Resolver(stand_in, config, nursery, cache), False
    zone = b"\x04corp\x07example\x00"  # corp.example. in wire form
    default, corp = routing.Target(stand_in), routing.Target(stand_in)
    routes = routing.Routes(config, default, {zone: corp}, cache=cache)
    return Resolver(stand_in, config, nursery, cache, routes=routes), True


def store(cache: AnswerCache, name: str) -> bytes:
    request = dns.message.make_query(name, "A")
    wire = request.to_wire()
    query = parse_query(wire)
    response = dns.message.make_response(request)
    response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.1"))
    key = cache_key(query)
    assert key is not None
    cache.put(key, response.to_wire(), HEADER_SIZE + len(query.question), trio.current_time())
    return wire


async def main() -> None:
    config = Config(upstreams=(parse_upstream("127.0.0.1:853#dns.test"),))
    async with trio.open_nursery() as nursery:
        cache = AnswerCache(size=10_000)
        resolver, split = make_resolver(config, nursery, cache)
        handler = QueryHandler(resolver, config, ServerStats())
        cases = {
            "repeated hit": [store(cache, "www.example.com.")] * VARIANTS,
            "hit": queries(letter_cases("www.example.com.", VARIANTS)),
            "forward miss": queries([f"n{i}.example.net." for i in range(VARIANTS)]),
        }
        if split:
            cases["zone miss"] = queries([f"n{i}.corp.example." for i in range(VARIANTS)])
            names = [f"{i % 250}.{i // 250}.168.192.in-addr.arpa." for i in range(VARIANTS)]
            cases["local answer"] = queries(names, "PTR")
        now = trio.current_time() + 1
        answer_at_once = handler.answer_at_once
        for label, inputs in cases.items():
            cycle = itertools.cycle(inputs)
            total = min(
                timeit.repeat(
                    lambda: answer_at_once(next(cycle), now, udp=True),  # noqa: B023
                    number=CALLS,
                    repeat=REPEATS,
                )
            )
            loop = min(timeit.repeat(lambda: next(cycle), number=CALLS, repeat=REPEATS))  # noqa: B023
            print(f"{label:14s} {(total - loop) / CALLS * 1e6:6.2f} µs")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
