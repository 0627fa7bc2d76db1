"""Per-key request limits of serving endpoints: ``calls`` per minute per ``user`` or per ``endpoint``.

Each limit is a GCRA (generic cell rate algorithm) cell: a burst of up to ``calls`` requests is
admitted at once, then one every ``60 / calls`` seconds, so no window of 60 s ever holds more
than ``calls`` admitted requests plus one. A refused request learns exactly when the next one
will pass (``Retry-After``). The clock is injected, so tests need no sleeping.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

from .._errors import RateLimitedError
from ..config import RateLimit
from ._shared import LocalCells, SharedCells

PERIOD_S = {"minute": 60.0}


def _refusal(endpoint: str, limit: RateLimit, wait: float) -> RateLimitedError:
    """The request is over ``limit``; ``retry_after`` seconds until it would pass."""
    who = "per user" if limit.key == "user" else "for the whole endpoint"
    return RateLimitedError(
        f"rate limit of serving endpoint {endpoint!r} exceeded: {limit.calls} calls per "
        f"{limit.renewal_period} {who}; retry after {wait:.2f} s",
        retry_after=wait,
    )


class RateLimiter:
    """Admits or refuses requests against the rate limits of every endpoint.

    ``cells`` keeps the counters: this process's (default) or a ``SharedCells`` table that
    every worker of ``ai-query serve --workers N`` uses.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, cells: LocalCells | SharedCells | None = None) -> None:
        self._clock = clock
        self._cells = cells if cells is not None else LocalCells()

    def admit(self, endpoint: str, limits: Iterable[RateLimit], user: str) -> None:
        """Count one request of ``user`` to ``endpoint``, or raise ``RateLimitedError`` (counting nothing)."""
        limits = tuple(limits)
        if not limits:
            return
        with self._cells as cells:
            now = self._clock()
            updates = []
            for limit in limits:
                interval = PERIOD_S[limit.renewal_period] / limit.calls
                tolerance = interval * (limit.calls - 1)
                key = (endpoint, limit.key, user if limit.key == "user" else "", str(limit.calls), limit.renewal_period)
                tat = max(cells.get(key, now), now)
                wait = tat - tolerance - now
                if wait > 0:
                    raise _refusal(endpoint, limit, wait)
                updates.append((key, tat + interval))
            cells.update(updates, now)  # only when every limit admits: a refusal costs nothing

    def forget(self, endpoint: str) -> None:
        """Drop the counters of ``endpoint`` (deleted, or its limits replaced)."""
        self._cells.forget(endpoint)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, never 0 (clients treat 0 as 'now')."""
    return str(max(1, math.ceil(seconds)))
