"""The local zone ``test.`` that unbound serves, and the query files drawn from it for dnsperf
(``write_queries`` for forwarding, ``write_cache_queries`` for caches).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


def _txt_rdata(label: str, index: int, length: int = 60) -> str:
    return f"{label}-{index:02d}-".ljust(length, "x")


@dataclass(frozen=True, slots=True)
class Zone:
    """The local zone unbound serves: ``h0.test`` .. ``h{hosts-1}.test`` and a few special names.

    - every host has A (198.18.0.0/15, RFC 2544) and AAAA (2001:db8::/32); every
      ``txt_every``-th host also has a short TXT;
    - ``big.test`` TXT: 30 records of 60 bytes, about 2.2 kB on the wire (over 1,232);
    - ``mid.test`` TXT: 11 records of 60 bytes, about 830 bytes (over 512, under 1,232);
    - any other name under ``test.`` is NXDOMAIN (``static`` zone), e.g. ``nx7.test``;
    - names outside ``test.`` are REFUSED at once (``local-zone: "." refuse``) rather than
      sent off to root servers this sandbox cannot reach, which would hang until SERVFAIL.

    Another ``origin`` makes another zone with the same shape (``h7.corp.example``): a
    second unbound serving it stands for a company's resolver in the split-DNS tests, and
    ``address_base`` (the second octet of its A records) tells its answers from the first's.
    """

    origin: str = "test."
    hosts: int = 3000
    txt_every: int = 10
    big_records: int = 30
    mid_records: int = 11
    ttl: int = 300
    address_base: int = 18

    @property
    def big_name(self) -> str:
        return f"big.{self.origin}"

    @property
    def mid_name(self) -> str:
        return f"mid.{self.origin}"

    def host(self, index: int) -> str:
        return f"h{index}.{self.origin}"

    def nxdomain_name(self, index: int) -> str:
        return f"nx{index}.{self.origin}"

    def a_address(self, index: int) -> str:
        return f"198.{self.address_base + index // 65536 % 2}.{index // 256 % 256}.{index % 256}"

    @staticmethod
    def aaaa_address(index: int) -> str:
        return f"2001:db8::{index:x}"

    def unbound_lines(self) -> list[str]:
        """The ``local-zone``/``local-data`` lines of the zone, for an unbound ``server:``."""
        lines = [f'local-zone: "{self.origin}" static', 'local-zone: "." refuse']
        for index in range(self.hosts):
            name = self.host(index)
            lines.append(f'local-data: "{name} {self.ttl} IN A {self.a_address(index)}"')
            lines.append(f'local-data: "{name} {self.ttl} IN AAAA {self.aaaa_address(index)}"')
            if index % self.txt_every == 0:
                lines.append(f"local-data: '{name} {self.ttl} IN TXT \"host {index}\"'")
        for name, label, count in (
            (self.big_name, "big", self.big_records),
            (self.mid_name, "mid", self.mid_records),
        ):
            for index in range(count):
                rdata = _txt_rdata(label, index)
                lines.append(f"local-data: '{name} {self.ttl} IN TXT \"{rdata}\"'")
        return lines


def write_zone(path: Path | str, zone: Zone | None = None) -> Path:
    """Write the zone as an unbound ``include:`` file (it starts with ``server:``)."""
    path = Path(path)
    body = "\n".join("    " + line for line in (zone or Zone()).unbound_lines())
    path.write_text(f"server:\n{body}\n")
    return path


def write_queries(
    path: Path | str,
    zone: Zone | None = None,
    *,
    count: int = 20_000,
    seed: int = 853,
    nxdomain_share: float = 0.1,
) -> Path:
    """Write a dnsperf query file: A, AAAA and TXT of hosts, plus NXDOMAIN names.

    Mix: about 50% A, 30% AAAA, 10% TXT (on hosts that have one), ``nxdomain_share``
    NXDOMAIN. ``big.test``/``mid.test`` are left out: dnsperf sends no EDNS, so over UDP
    they would come back truncated and the runs would measure truncation, not forwarding.
    """
    zone = zone or Zone()
    rng = random.Random(seed)  # a fixed seed: every run and every system sees the same file
    lines = []
    for _ in range(count):
        roll = rng.random()
        index = rng.randrange(zone.hosts)
        if roll < nxdomain_share:
            lines.append(f"{zone.nxdomain_name(index)} A")
        elif roll < nxdomain_share + 0.1:
            lines.append(f"{zone.host(index - index % zone.txt_every)} TXT")
        elif roll < nxdomain_share + 0.4:
            lines.append(f"{zone.host(index)} AAAA")
        else:
            lines.append(f"{zone.host(index)} A")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def zone_questions(zone: Zone | None = None) -> list[str]:
    """Every question ``zone`` answers NOERROR with data, once, as dnsperf lines
    (``"h7.test. AAAA"``): A and AAAA of every host, TXT of every ``txt_every``-th.

    ``big.test``/``mid.test`` are left out, as in :func:`write_queries`.
    """
    zone = zone or Zone()
    questions = []
    for index in range(zone.hosts):
        name = zone.host(index)
        questions += [f"{name} A", f"{name} AAAA"]
        if index % zone.txt_every == 0:
            questions.append(f"{name} TXT")
    return questions


def write_cache_queries(
    directory: Path | str, zone: Zone | None = None, *, hits: int = 100
) -> tuple[Path, Path]:
    """Write two dnsperf files for measuring caches; return their paths ``(hits, fill)``.

    ``hits.txt``: ``hits`` questions spread evenly over :func:`zone_questions`, to be asked
    again and again once each has been answered. ``fill.txt``: every question of the zone once,
    the hit questions last, so that a least-recently-used cache filled from it ends up holding
    them (the ones before may have been evicted).
    """
    questions = zone_questions(zone)
    if not 0 < hits <= len(questions):
        raise ValueError(f"hits must be 1..{len(questions)}, not {hits}")
    chosen = questions[:: len(questions) // hits][:hits]
    taken = set(chosen)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hits_file, fill_file = directory / "hits.txt", directory / "fill.txt"
    hits_file.write_text("\n".join(chosen) + "\n")
    fill = [question for question in questions if question not in taken] + chosen
    fill_file.write_text("\n".join(fill) + "\n")
    return hits_file, fill_file
