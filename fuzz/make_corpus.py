"""Write the seed corpus: real queries made with dnspython, each with its control bytes.

    python fuzz/make_corpus.py            # rewrites fuzz/corpus/

Every file is ``harness.encode(query, ...)``: three control bytes (transport, padding, upstream
behaviours; see ``fuzz/harness.py``), then the client's message. Names say what each seed is.
Re-running gives the same bytes (fixed IDs), so the committed corpus only changes on purpose.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, and fuzz/ is no installed package: its harness (and, ahead of any
# installed copy, dot_proxy) come from this checkout.
sys.path.insert(0, str(ROOT))

import dns.edns  # noqa: E402
import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.opcode  # noqa: E402
import dns.rcode  # noqa: E402
import dns.tsigkeyring  # noqa: E402

from fuzz.harness import Mode, encode  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"


def query(name: str, rdtype: str = "A", *, msg_id: int = 0x1234, **edns: object) -> bytes:
    """A query with a fixed ID; ``edns`` keywords go to ``use_edns`` (none: no OPT record)."""
    message = dns.message.make_query(name, rdtype, use_edns=False)
    message.id = msg_id
    if edns:
        message.use_edns(**edns)  # type: ignore[arg-type]
    wire: bytes = message.to_wire()
    return wire


def notify() -> bytes:
    message = dns.message.make_query("example.com.", "SOA", use_edns=False)
    message.id = 0x2222
    message.set_opcode(dns.opcode.NOTIFY)
    message.flags &= ~dns.flags.RD
    wire: bytes = message.to_wire()
    return wire


def response(rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> bytes:
    message = dns.message.make_response(dns.message.from_wire(query("example.com.")))
    message.set_rcode(rcode)
    wire: bytes = message.to_wire()
    return wire


def signed() -> bytes:
    keyring = dns.tsigkeyring.from_text({"key.example.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    message = dns.message.make_query("example.com.", "A", use_edns=0)
    message.id = 0x3333
    message.use_tsig(keyring, keyname="key.example.")
    # TSIG signs the time: a fixed one keeps the seed's bytes the same on every run.
    with mock.patch("dns.message.time.time", return_value=1_700_000_000.0):
        wire: bytes = message.to_wire()
    return wire


def seeds() -> Iterator[tuple[str, bytes]]:
    """(file name, input) for every seed."""
    plain_a = query("example.com.")
    edns_aaaa = query("www.example.org.", "AAAA", edns=0, payload=1232)
    do_txt = query("txt.example.", "TXT", edns=0, payload=4096, ednsflags=dns.flags.DO)
    cookie = query(
        "cookie.example.",
        edns=0,
        payload=1232,
        options=[dns.edns.CookieOption(b"\x01\x02\x03\x04\x05\x06\x07\x08", b"")],
    )
    padded = query(
        "padded.example.",
        edns=0,
        payload=1232,
        options=[dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(40))],
    )
    small_edns = query("small.example.", "TXT", edns=0, payload=512)
    yield "a-udp-answer", encode(plain_a)
    yield "a-tcp-answer", encode(plain_a, udp=False)
    yield "a-udp-nopadding", encode(plain_a, padding=False)
    yield "aaaa-edns-udp-big", encode(edns_aaaa, modes=(Mode.BIG,))
    yield "aaaa-edns-tcp-big", encode(edns_aaaa, udp=False, modes=(Mode.BIG,))
    yield "txt-do-tcp-padded", encode(do_txt, udp=False, modes=(Mode.PADDED,))
    yield "txt-do-udp-truncated", encode(do_txt, modes=(Mode.TRUNCATED,))
    yield "txt-edns512-udp-big", encode(small_edns, modes=(Mode.BIG,))
    yield "a-udp-big-noedns", encode(plain_a, modes=(Mode.BIG,), padding=False)
    yield "cookie-udp-servfail-failover", encode(cookie, modes=(Mode.SERVFAIL, Mode.ANSWER))
    yield "padded-udp-answer", encode(padded)
    yield "padded-udp-padded-nopad", encode(padded, modes=(Mode.PADDED,), padding=False)
    yield "a-udp-hang", encode(plain_a, modes=(Mode.HANG,))
    yield "a-udp-close-failover", encode(plain_a, modes=(Mode.CLOSE, Mode.ANSWER))
    yield "a-udp-midframe-failover", encode(plain_a, modes=(Mode.CLOSE_MID_FRAME, Mode.ANSWER))
    yield "a-udp-wrong-question", encode(plain_a, modes=(Mode.WRONG_QUESTION_FIRST,))
    yield "a-udp-wrong-id", encode(plain_a, modes=(Mode.WRONG_ID_FIRST,))
    yield "a-udp-garbage-failover", encode(plain_a, modes=(Mode.GARBAGE, Mode.ANSWER))
    yield "a-udp-twice", encode(plain_a, modes=(Mode.TWICE,))
    yield (
        "a-udp-slow-hedged",
        encode(plain_a, modes=(Mode.SLOW, Mode.ANSWER), policy="fastest", hedge_after=0.5),
    )
    yield (
        "a-udp-stall-roundrobin",
        encode(plain_a, modes=(Mode.STALL, Mode.STALL), policy="round-robin"),
    )
    yield "a-udp-uppercase", encode(query("MiXeD.ExAmPlE."), modes=(Mode.UPPERCASE,))
    yield "a-udp-echo", encode(plain_a, modes=(Mode.ECHO,))
    yield "a-udp-huge-prefix", encode(plain_a, modes=(Mode.HUGE_PREFIX, Mode.REFUSED))
    yield "a-udp-refused-both", encode(plain_a, modes=(Mode.REFUSED, Mode.REFUSED))
    yield "a-udp-connect-refused", encode(plain_a, modes=(Mode.CONNECT_REFUSED, Mode.ANSWER))
    yield "a-udp-connect-hang", encode(plain_a, modes=(Mode.CONNECT_HANG, Mode.TLS_FAILS))
    yield "notify-udp", encode(notify())
    yield "response-udp", encode(response())
    yield "error-response-udp", encode(response(dns.rcode.SERVFAIL))
    yield "tsig-udp", encode(signed())
    yield "truncated-header", encode(plain_a[:7])
    yield "truncated-question", encode(plain_a[:20])
    yield "truncated-opt", encode(edns_aaaa[:-3])
    two_questions = bytearray(plain_a)
    two_questions[5] = 2
    yield "two-questions", encode(bytes(two_questions) + plain_a[12:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CORPUS, help="corpus directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds():
        (args.out / name).write_bytes(data)
    print(f"wrote {len(list(seeds()))} seeds to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
