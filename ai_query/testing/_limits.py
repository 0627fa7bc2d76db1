"""The simulator's requests/min and tokens/min quota, charged at admission: fixed windows, or a sliding one.

The rule (``rpm_limit`` / ``tpm_limit`` per ``window_s``): windows are consecutive fixed
windows aligned to start/reset, or with ``quota_window="sliding"`` any span of ``window_s`` (a
request counts from its admission for ``window_s``; a refund goes to the admission that paid, if
it is still counted). At admission a request is charged 1 request and
``prompt_tokens + max_tokens * number_of_prompts`` tokens (``max_tokens`` as sent, else
``default_max_tokens``; embeddings: prompt tokens only), as OpenAI does; nothing is given back
unless ``tpm_refund_unused`` (then a successful answer returns its unused ``max_tokens`` to the
window that paid, if that window is still current). A request whose charge alone exceeds
``tpm_limit`` can never pass and is refused 400, not 429. Every answer past the quota check
carries the rate-limit headers (OpenAI and serving: ``x-ratelimit-{limit,remaining,reset}-
{requests,tokens}``, reset as ``"250ms"``/``"1.5s"``/``"1m0s"``; Anthropic: ``anthropic-ratelimit-
{requests,tokens}-{limit,remaining,reset}``, reset as an RFC 3339 time); a 429 adds
``Retry-After`` (seconds, fractional, rounded up to the ms) and ``retry-after-ms``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable


class FixedWindowQuota:
    """At most ``rpm_limit`` requests and ``tpm_limit`` tokens per window of ``window_s`` seconds.

    Windows are consecutive and aligned to :meth:`restart` (the simulator's start or reset), so a
    refused request can be told exactly when the next window opens. A request is charged its
    whole ``cost`` when admitted; :meth:`refund` gives part back to the window that paid it.
    """

    __slots__ = ("rpm_limit", "tpm_limit", "window_s", "_clock", "epoch", "window", "requests", "tokens", "ticket")

    def __init__(self, rpm_limit: int | None, tpm_limit: int | None, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        self.window_s = window_s
        self._clock = clock
        self.restart()

    def restart(self) -> None:
        self.epoch = self._clock()
        self.window = 0
        self.requests = 0
        self.tokens = 0

    def _roll(self, now: float) -> float:
        """Move to the window ``now`` is in; return the seconds until it ends."""
        window = int((now - self.epoch) // self.window_s)
        if window != self.window:
            self.window, self.requests, self.tokens = window, 0, 0
        return self.epoch + (window + 1) * self.window_s - now

    def admit(self, cost: int) -> tuple[str | None, float]:
        """Charge one request of ``cost`` tokens, or refuse it.

        Returns ``(None, seconds_to_reset)`` when admitted, ``("requests" | "tokens", seconds_to_reset)``
        when the window has no room left for it.
        """
        reset_s = self._roll(self._clock())
        if self.rpm_limit is not None and self.requests >= self.rpm_limit:
            return "requests", reset_s
        if self.tpm_limit is not None and self.tokens + cost > self.tpm_limit:
            return "tokens", reset_s
        self.requests += 1
        self.tokens += cost
        self.ticket: object = self.window
        return None, reset_s

    def refund(self, window: object, tokens: int) -> int:
        """Give ``tokens`` back to ``window`` if it is still the current one; return how many went back."""
        if window != self.window:
            return 0
        given = min(tokens, self.tokens)
        self.tokens -= given
        return given

    def seconds_to_reset(self) -> float:
        return self._roll(self._clock())

    @property
    def remaining_requests(self) -> int | None:
        return None if self.rpm_limit is None else max(0, self.rpm_limit - self.requests)

    @property
    def remaining_tokens(self) -> int | None:
        return None if self.tpm_limit is None else max(0, self.tpm_limit - self.tokens)


class SlidingWindowQuota(FixedWindowQuota):
    """At most ``rpm_limit`` requests and ``tpm_limit`` tokens in any span of ``window_s`` seconds.

    A request counts from the instant it is admitted until ``window_s`` later (many providers
    count so); a client that keeps to the limits by the time it *admits* rather than by the time
    it *sends* trips this one at every slide. ``window`` still numbers fixed windows from
    :meth:`restart`, for the per-window counters; :meth:`refund` takes the ``ticket`` of an admission.
    """

    __slots__ = ("_events",)

    def restart(self) -> None:
        super().restart()
        self._events: deque[list[float]] = deque()  # [admitted at, tokens]

    def _slide(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self.requests -= 1
            self.tokens -= int(self._events.popleft()[1])

    def _until_fits(self, now: float, requests: int, tokens: int) -> float:
        """Seconds until the oldest admissions that must leave for this one have left."""
        over_requests, over_tokens = requests, tokens
        for at, cost in self._events:
            over_requests -= 1
            over_tokens -= int(cost)
            if over_requests <= 0 and over_tokens <= 0:
                return max(0.0, at + self.window_s - now)
        return self.window_s

    def admit(self, cost: int) -> tuple[str | None, float]:
        now = self._clock()
        self.window = int((now - self.epoch) // self.window_s)
        self._slide(now)
        if self.rpm_limit is not None and self.requests >= self.rpm_limit:
            return "requests", self._until_fits(now, self.requests - self.rpm_limit + 1, 0)
        if self.tpm_limit is not None and self.tokens + cost > self.tpm_limit:
            return "tokens", self._until_fits(now, 0, self.tokens + cost - self.tpm_limit)
        self.requests += 1
        self.tokens += cost
        self.ticket = [now, float(cost)]
        self._events.append(self.ticket)
        return None, self.window_s

    def refund(self, ticket: object, tokens: int) -> int:
        """Give ``tokens`` back to the admission ``ticket`` if it is still in the window."""
        self._slide(self._clock())
        if not isinstance(ticket, list) or not self._events or ticket[0] < self._events[0][0]:
            return 0
        given = min(tokens, int(ticket[1]))
        ticket[1] -= given
        self.tokens -= given
        return given

    def seconds_to_reset(self) -> float:
        now = self._clock()
        self._slide(now)
        return self._events[0][0] + self.window_s - now if self._events else self.window_s
