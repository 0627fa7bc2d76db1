"""Adaptive concurrency: find how many requests an endpoint takes in flight, and keep to it.

``AdaptiveConcurrencyLimiter`` does AIMD (additive increase, multiplicative decrease): an
overload signal (429, a 503 with Retry-After, a timeout) multiplies the limit by ``backoff`` (0.9,
as in Netflix's concurrency-limits AIMD), at most once per observed round trip, so a burst of
429s from one window counts as one signal. Until the first overload signal it grows by one per
success (slow start: about doubling per round trip), so an endpoint with room is found in a few
round trips instead of one step per round trip.

After that, growth per round trip is shaped like TCP CUBIC's around ``W_max``, the limit at the
last decrease: below it, half the gap (back quickly to what worked); at it, a slow probe (a
quarter request); above it, faster the further it has grown without a signal (the endpoint has
more room now). A flat +1 per round trip probes past the endpoint's capacity every two or three
round trips, and each probe costs a burst of 429s; the plateau makes probes rarer where the
last overload happened and still finds new room sooner (the measurements are in
``bench/README.md``, "Why the AIMD limiter plateaus"). The clock is injected, so tests need no
real time.
"""

from __future__ import annotations

import time
from typing import Callable

from .slots import Outcome, SlotQueue


class AdaptiveConcurrencyLimiter:
    """AIMD limit on requests in flight, between ``minimum`` and ``maximum``."""

    def __init__(
        self,
        initial: int = 8,
        *,
        minimum: int = 1,
        maximum: int = 256,
        backoff: float = 0.9,
        slow_start: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= initial ({initial}) <= maximum ({maximum})")
        if not 0.0 < backoff < 1.0:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        self.minimum = minimum
        self.maximum = maximum
        self.backoff = backoff
        self._clock = clock
        self._limit = float(initial)
        self._slots = SlotQueue(lambda: self.limit)
        self._last_decrease = -float("inf")
        self._rtt = 0.0  # smoothed latency of recent requests, the spacing between two decreases
        self._slow_start = slow_start
        self._ssthresh: float | None = None
        """Where a slow start after a raised ceiling ends (None: at the first overload signal)."""
        self._w_max: float | None = None
        """The limit at the last decrease (None: none yet); growth slows down near it."""
        self.overload_signals = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(self.minimum, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._slots.in_flight

    async def acquire(self) -> float:
        """Wait for a slot (first come, first served); returns the clock reading at admission (pass it to ``release``)."""
        await self._slots.take()
        return self._clock()

    def set_maximum(self, maximum: int) -> None:
        """A new ceiling: this worker's share of the endpoint changed (other workers came or went).

        A lower ceiling scales the limit down with it (the newcomer takes its part of what was
        found). A higher one slow-starts (about doubling per round trip) up to the limit scaled
        by the same factor (what the departed worker held, about), like TCP's ``ssthresh``, and
        probes additively from there: a doubling straight past capacity would cost a burst of 429s.
        """
        maximum = max(self.minimum, int(maximum))
        if maximum == self.maximum:
            return
        if self._w_max is not None:  # the overload point, in this worker's share of the endpoint
            self._w_max *= maximum / self.maximum
        if maximum < self.maximum:
            self._limit = max(float(self.minimum), self._limit * maximum / self.maximum)
        else:
            self._slow_start = True
            self._ssthresh = self._limit * maximum / self.maximum
        self.maximum = maximum
        self._slots.hand_over()

    def set_lease(self, lease: int | None) -> None:
        """At most ``lease`` in flight whatever the limit: the slots leased from the driver's broker."""
        self._slots.set_lease(lease)

    def try_acquire(self) -> float | None:
        """Take a slot if one is free now (no waiting); ``None`` otherwise."""
        return self._clock() if self._slots.try_take() else None

    def on_outcome(self, outcome: Outcome, started: float | None = None) -> None:
        """Adjust the limit for one finished request (without releasing a slot)."""
        now = self._clock()
        if started is not None and outcome == "ok":
            latency = max(0.0, now - started)
            self._rtt = latency if self._rtt == 0.0 else 0.8 * self._rtt + 0.2 * latency
        if outcome == "ok":
            # Slow start (about doubling per round trip) until the first overload; then a round
            # trip's worth of successes (about ``limit``) adds ``_growth_per_round_trip()``.
            step = 1.0 if self._slow_start else self._growth_per_round_trip() / max(self._limit, 1.0)
            self._limit = min(float(self.maximum), self._limit + step)
            if self._slow_start and self._ssthresh is not None and self._limit >= self._ssthresh:
                self._slow_start, self._ssthresh = False, None
        elif outcome == "overload":
            self.overload_signals += 1
            self._slow_start, self._ssthresh = False, None
            if now - self._last_decrease >= max(self._rtt, 1e-3):
                self._w_max = self._limit
                self._limit = max(float(self.minimum), self._limit * self.backoff)
                self._last_decrease = now
                self.decreases += 1
            if started is not None and now - started < 0.5 * self._rtt:
                # Refused on arrival (a cap, not a slow answer): the others in flight are what
                # the endpoint holds, so the refused slot is not refilled. Without this, between
                # two decreases every freed slot drew another 429 at once, a few ms each: hundreds
                # per round trip above capacity (a 14 % 429 share over a short job).
                self._limit = max(float(self.minimum), self._limit * 0.5, min(self._limit, float(self._slots.in_flight - 1)))

    def on_shared_overload(self) -> None:
        """Another worker sending to the endpoint was refused: the shared capacity is reached, so
        this one's slow start ends too (each doubling on its own overshot it by the others' part)."""
        if self._slow_start:
            self._slow_start, self._ssthresh = False, None
            self._w_max = self._limit

    def _growth_per_round_trip(self) -> float:
        """+1 before any decrease; then CUBIC-like around ``W_max`` (see the module docstring)."""
        if self._w_max is None:
            return 1.0
        gap = self._w_max - self._limit
        return max(0.25, gap / 2) if gap > 0 else 0.25 - gap / 4

    async def release(self, outcome: Outcome, started: float | None = None) -> None:
        """Free the slot, adapt the limit to the outcome, and hand free slots to waiting rows."""
        self.on_outcome(outcome, started)
        self._slots.give_back()
