"""Per-query policy, no sockets: which upstream answers, and what counts as an answer."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dot_proxy.errors import UpstreamError
from dot_proxy.upstream import Upstream

__all__ = ["Resolver"]

log = logging.getLogger(__name__)


class Resolver:
    """Send a query to the upstreams in order until one answers.

    The deadline is the caller's cancel scope: the resolver only decides where to ask next.
    """

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        if not upstreams:
            raise ValueError("a resolver needs at least one upstream")
        self._upstreams = tuple(upstreams)

    @property
    def upstreams(self) -> Sequence[Upstream]:
        """The upstreams, in the order they are tried."""
        return self._upstreams

    async def resolve(self, message: bytes, question_key: bytes) -> bytes:
        """The first valid answer to ``message`` from any upstream, with an arbitrary ID.

        Error handling: an upstream that fails (refused, TLS failure, closed) is skipped at once
        for the next; when all have failed, raises the last :class:`UpstreamError`.
        """
        error: UpstreamError | None = None
        for upstream in self._upstreams:
            try:
                return await upstream.query(message, question_key)
            except UpstreamError as exc:
                log.debug("%s", exc)
                error = exc
        assert error is not None
        raise error
