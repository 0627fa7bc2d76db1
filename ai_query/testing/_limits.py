"""The simulator's requests/min and tokens/min quota: fixed windows, charged at admission."""

from __future__ import annotations

import time
from typing import Callable


class FixedWindowQuota:
    """At most ``rpm_limit`` requests and ``tpm_limit`` tokens per window of ``window_s`` seconds.

    Windows are consecutive and aligned to :meth:`restart` (the simulator's start or reset), so a
    refused request can be told exactly when the next window opens. A request is charged its
    whole ``cost`` when admitted; :meth:`refund` gives part back to the window that paid it.
    """

    __slots__ = ("rpm_limit", "tpm_limit", "window_s", "_clock", "epoch", "window", "requests", "tokens")

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
        return None, reset_s

    def refund(self, window: int, tokens: int) -> int:
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
