"""The fuzz target's invariants, without atheris: every seed, and every crash the fuzzer found.

``fuzz/harness.py`` runs one input through the real query path (QueryHandler, UpstreamGroup,
Upstream pools) over in-memory fake upstreams and checks it; ``nox -s fuzz`` runs the same
harness under atheris. Here, in the default test session, the committed seed corpus replays
through it, the checker is shown to catch what it claims to, and each input the fuzzer ever
crashed on stays fixed.
"""

from __future__ import annotations

from pathlib import Path

import dns.message
import dns.rrset
import pytest

from dot_proxy.handler import ServerStats
from fuzz.harness import (
    Case,
    InvariantViolation,
    Mode,
    Outcome,
    QueryPath,
    TrioPump,
    check,
    decode,
    encode,
    run_input,
)
from fuzz.make_corpus import seeds

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"
SEEDS = sorted(CORPUS.iterdir())


@pytest.fixture(scope="module")
def query_path() -> QueryPath:
    return QueryPath()


@pytest.mark.parametrize("seed", SEEDS, ids=[path.name for path in SEEDS])
def test_seed_keeps_the_invariants(query_path: QueryPath, seed: Path) -> None:
    assert run_input(query_path, seed.read_bytes()) is not None


def test_corpus_is_what_make_corpus_writes() -> None:
    # The committed seeds are reproducible: regenerating them changes nothing.
    made = dict(seeds())
    assert sorted(made) == [path.name for path in SEEDS]
    for path in SEEDS:
        assert path.read_bytes() == made[path.name], path.name


def test_the_fuzzer_s_trio_pump_gives_the_same_answers(query_path: QueryPath) -> None:
    # The atheris target keeps one trio guest run for all inputs; it must not change results.
    # (No trio.run while a guest run is active in this thread: one pass, then the other.)
    inputs = [seed.read_bytes() for seed in SEEDS]
    alone = [run_input(query_path, data) for data in inputs]
    with TrioPump() as pump:
        kept = [run_input(QueryPath(pump), data) for data in inputs]
    for seed, one, other in zip(SEEDS, alone, kept, strict=True):
        assert one is not None
        assert other is not None
        assert one.answer == other.answer, seed.name
        # The kept run's clock does not restart at zero: equal up to rounding.
        assert one.elapsed == pytest.approx(other.elapsed, abs=1e-9), seed.name


def test_seeds_cover_every_upstream_mode() -> None:
    used = {mode for path in SEEDS if (case := decode(path.read_bytes())) for mode in case.modes}
    assert used == set(Mode)


def test_inputs_shorter_than_the_control_bytes_are_skipped(query_path: QueryPath) -> None:
    assert run_input(query_path, b"\x01\x00") is None


# --- the checker catches what it claims to -------------------------------------------------------

QUERY = dns.message.make_query("example.com.", "A", use_edns=False).to_wire()


def _case(message: bytes = QUERY, *, udp: bool = True) -> Case:
    case = decode(encode(message, udp=udp))
    assert case is not None
    return case


def _outcome(answer: bytes | None, **stats: int) -> Outcome:
    return Outcome(answer, elapsed=0.0, stats=ServerStats(**stats))


def _answer(query: bytes = QUERY, *, rcode: int = 0, echo: bool = True) -> bytes:
    response = dns.message.make_response(dns.message.from_wire(query))
    response.set_rcode(rcode)
    if not echo:
        response.question = []
    wire: bytes = response.to_wire()
    return wire


def test_check_accepts_a_good_answer() -> None:
    check(_case(), _outcome(_answer()))


@pytest.mark.parametrize(
    ("answer", "stats", "why"),
    [
        (b"\x12\x34" + _answer()[2:], {}, "not the query's"),
        (_answer()[:20], {}, "cannot read"),
        (_answer(rcode=2, echo=False), {}, "does not echo"),
        (_answer(), {"errors": 1}, "unexpected exception"),
        (_answer() + b"\x00" * 600, {}, "cannot read"),
        (b"\x00", {}, "shorter than a header"),
    ],
    ids=["wrong-id", "unreadable", "servfail-without-question", "handler-bug", "junk", "short"],
)
def test_check_catches(answer: bytes, stats: dict[str, int], why: str) -> None:
    with pytest.raises(InvariantViolation, match=why):
        check(_case(), _outcome(answer, **stats))


def test_check_catches_an_oversized_udp_answer() -> None:
    big = dns.message.make_response(dns.message.from_wire(QUERY))
    big.answer.append(
        dns.rrset.from_text_list(
            "example.com.", 300, "IN", "TXT", [f'"{index}{"x" * 200}"' for index in range(3)]
        )
    )
    wire = big.to_wire()
    assert len(wire) > 512
    check(_case(udp=False), _outcome(wire))
    with pytest.raises(InvariantViolation, match="over the client's limit of 512"):
        check(_case(udp=True), _outcome(wire))


def test_check_catches_an_answer_to_less_than_a_header() -> None:
    with pytest.raises(InvariantViolation, match="shorter than a header"):
        check(_case(QUERY[:5]), _outcome(_answer()))


def test_check_catches_an_answer_past_the_deadline() -> None:
    late = Outcome(_answer(), elapsed=5.5, stats=ServerStats())
    with pytest.raises(InvariantViolation, match="past the 5 s deadline"):
        check(_case(), late)


# --- regressions: inputs the fuzzer crashed on ---------------------------------------------------

# Each file in fuzz/regressions/ is an input the fuzzer crashed on, named for what went wrong:
#
# - echo-pointer-into-header: a harness false alarm, not a proxy bug. The client's query (echoed
#   by the ECHO upstream) holds a record whose name is a compression pointer to offset 0, so
#   dnspython reads the message ID as a label: with the upstream's ID 0 that is the root name,
#   with the client's ID 0x1234 an unknown label type. The proxy rightly restores the client's
#   ID; the checker now asks whether the upstream's answer is readable *with that ID*.
REGRESSIONS = sorted((CORPUS.parent / "regressions").iterdir())


@pytest.mark.parametrize("crash", REGRESSIONS, ids=[path.name for path in REGRESSIONS])
def test_fuzzer_crash_stays_fixed(query_path: QueryPath, crash: Path) -> None:
    assert run_input(query_path, crash.read_bytes()) is not None
