"""A fuzz input decoded: three control bytes, then the client's message.

- byte 0, flags: bit 0 UDP (else TCP), bit 1 padding off, bit 2 two upstreams (else one),
  bits 3-4 upstream policy, bit 5 hedge after a fixed 0.5 s (else after the p95);
- bytes 1 and 2: what upstream 0 and upstream 1 do (:class:`Mode`, taken modulo its size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from dot_proxy.config import UPSTREAM_POLICIES
from fuzz.fake_upstreams import Mode

__all__ = ["CONTROL_SIZE", "HEDGE_AFTER", "Case", "decode", "encode"]

CONTROL_SIZE: Final = 3
HEDGE_AFTER: Final = 0.5


@dataclass(frozen=True, slots=True)
class Case:
    """One decoded fuzz input."""

    udp: bool
    padding: bool
    policy: str
    hedge_after: float | None
    modes: tuple[Mode, ...]  # one per upstream
    message: bytes


def decode(data: bytes) -> Case | None:
    """The case an input stands for, or None when it is shorter than its control bytes."""
    if len(data) < CONTROL_SIZE:
        return None
    flags = data[0]
    count = 2 if flags & 0b100 else 1
    modes = tuple(Mode(data[1 + index] % len(Mode)) for index in range(count))
    return Case(
        udp=bool(flags & 0b1),
        padding=not flags & 0b10,
        policy=UPSTREAM_POLICIES[(flags >> 3) % 4 % len(UPSTREAM_POLICIES)],
        hedge_after=HEDGE_AFTER if flags & 0b100000 else None,
        modes=modes,
        message=data[CONTROL_SIZE:],
    )


def encode(
    message: bytes,
    *,
    udp: bool = True,
    padding: bool = True,
    modes: tuple[Mode, ...] = (Mode.ANSWER,),
    policy: str = "failover",
    hedge_after: float | None = None,
) -> bytes:
    """The input bytes for a case: the inverse of :func:`decode`, for seeds and tests."""
    if not 1 <= len(modes) <= 2:
        raise ValueError("one or two upstreams")
    flags = (
        int(udp)
        | (0 if padding else 0b10)
        | (0b100 if len(modes) == 2 else 0)
        | UPSTREAM_POLICIES.index(policy) << 3
        | (0b100000 if hedge_after is not None else 0)
    )
    second = modes[1] if len(modes) == 2 else Mode.ANSWER
    return bytes([flags, modes[0], second]) + message
