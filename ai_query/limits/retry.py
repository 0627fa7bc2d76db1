"""The retry policy, composed from tenacity: what is retried, how long to wait, when to stop.

- retried: ``RetryableEndpointError`` (429, 5xx, timeouts, resets, unparseable 200 bodies);
  never ``PermanentEndpointError`` (400, 401, 403, 404, ...).
- wait: the server's ``Retry-After`` when it gives one; a random fault's retry at once (the first
  always, later ones while the row's streak of faults is plausible bad luck given the endpoint's
  recent fault share); else jittered exponential backoff, capped.
- stop: after ``max_attempts`` failures that were not rate limits; rate-limited rows keep waiting
  for the next quota window until ``rate_limit_wait_s`` has passed since their first attempt.
- an outage (``EndpointUnavailableError``: a failure met while the endpoint's circuit breaker is
  open, see ``breaker``) is retried at once, costs no attempt and no budget: the retry waits in
  the breaker, which fails the row once the outage outlasts ``outage_wait_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

import tenacity
from tenacity import AsyncRetrying, wait_exponential_jitter
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .._logging import Throttled
from .._errors import (
    EndpointTimeoutError, EndpointUnavailableError, RateLimitedError, ReplicaUnavailableError, RetryableEndpointError,
)


class wait_retry_after(wait_base):
    """Wait what the server asked for (``Retry-After``) or, failing that, ``fallback``; capped."""

    def __init__(self, fallback: wait_base, cap: float = 60.0) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return min(self.cap, exc.retry_after)
        return min(self.cap, self.fallback(retry_state))


class RecentFaults:
    """The share ``p`` of random faults among an endpoint's last ``window`` answered attempts.

    ``bad_luck(n)`` says whether a row's streak of ``n`` faults in a row is plausible at that
    share: ``p ** n >= plausible_streak`` while under ``threshold`` of the attempts failed.
    """

    def __init__(self, window: int = 100, threshold: float = 0.5, plausible_streak: float = 1e-4) -> None:
        self.threshold = threshold
        self.plausible_streak = plausible_streak
        self._recent: deque[bool] = deque(maxlen=window)
        self._faults = 0

    def record(self, fault: bool) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._faults -= self._recent[0]
        self._recent.append(fault)
        self._faults += fault

    @property
    def share(self) -> float:
        return self._faults / len(self._recent) if self._recent else 0.0

    def bad_luck(self, faults: int) -> bool:
        share = self.share
        return share < self.threshold and share ** faults >= self.plausible_streak


class wait_fault_at_once(wait_base):
    """Retry a random fault at once while its row's streak of faults is plausible bad luck.

    A fault is a 5xx without Retry-After, a reset or an unparseable body: the endpoint says
    nothing about load. Waiting before retrying it does not spare the endpoint: the
    concurrency limiter still holds the requests in flight to what it takes (the retry queues
    behind the rows waiting for a slot) and the retry budget caps the extra requests. It only
    leaves the slot idle in a batch's last rows, where nothing else waits, and stretches the end
    of the job. Finagle's requeues and gRPC's transparent retries go at once, under a budget.

    So the first retry always goes at once, and a later one while ``bad_luck(n)`` (see
    ``RecentFaults``) holds for the row's ``n`` faults in a row: with 14 % random faults the
    retries up to the fifth attempt go at once (a 4-fault streak, 1 row in 2,600, is bad luck
    several times in a 24,000-row job: backing it off stretched the job's end); a row failing a
    third time on an endpoint that failed a few requests in its last 100 (a restart, an outage)
    waits, so a brief outage does not see a row's attempts spent in a burst. Without
    ``bad_luck`` every retry after the first backs off. Rate limits and timeouts are signs of
    load and back off from the first retry.
    """

    def __init__(self, then: wait_base, bad_luck: Callable[[int], bool] | None = None) -> None:
        self.then = then
        self.bad_luck = bad_luck

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, EndpointUnavailableError) and exc.breaker_open:  # the breaker does the waiting
            return 0.0
        if isinstance(exc, RetryableEndpointError) and not isinstance(exc, (RateLimitedError, EndpointTimeoutError)):
            faults = retry_state.attempt_number  # every attempt so far failed
            if faults == 1 or (self.bad_luck is not None and self.bad_luck(faults)):
                return 0.0
        return self.then(retry_state)


class stop_for_endpoint(stop_base):
    """Stop after ``max_attempts`` failures other than rate limits and outages, or when rate limits
    outlast ``rate_limit_wait_s``."""

    def __init__(self, max_attempts: int, rate_limit_wait_s: float, clock: Callable[[], float],
                 started: float | None = None) -> None:
        self.max_attempts = max_attempts
        self.rate_limit_wait_s = rate_limit_wait_s
        self.clock = clock
        self.started = clock() if started is None else started
        """When the row's first attempt began: the rate-limit wait counts from there."""
        self.other_failures = 0

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RateLimitedError):
            return self.clock() - self.started >= self.rate_limit_wait_s
        if isinstance(exc, EndpointUnavailableError):  # the breaker bounds the wait (outage_wait_s)
            return False
        self.other_failures += 1
        return self.other_failures >= self.max_attempts


class RetryBudget:
    """A bucket of retries for failures other than rate limits, so a dead endpoint cannot cause a storm.

    It starts with ``floor`` retries, gains ``ratio`` per first attempt and holds at most
    ``cap``; each retry spends one. A healthy endpoint with sporadic faults never runs dry;
    one that fails everything gets about ``ratio`` retries per new row once the bucket is
    spent, instead of ``max_attempts - 1``.
    """

    def __init__(self, ratio: float = 0.5, floor: float = 10.0, cap: float = 100.0) -> None:
        self.ratio = ratio
        self.cap = max(cap, floor)
        self.balance = float(floor)

    def record_first_attempt(self) -> None:
        self.balance = min(self.cap, self.balance + self.ratio)

    def can_retry(self) -> bool:
        return self.balance >= 1.0

    def spend(self) -> None:
        self.balance -= 1.0


class retry_within_budget(tenacity.retry_base):
    """Retry ``RetryableEndpointError``; rate limits always, other failures while the budget lasts."""

    def __init__(self, budget: RetryBudget | None) -> None:
        self.budget = budget
        self.exhausted = False

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if not isinstance(exc, RetryableEndpointError):
            return False
        if isinstance(exc, (RateLimitedError, ReplicaUnavailableError, EndpointUnavailableError)) or self.budget is None:
            return True
        if not self.budget.can_retry():
            self.exhausted = True
            return False
        self.budget.spend()
        return True


def log_retry(endpoint: str, limiter: Any, throttled: Throttled) -> Callable[[tenacity.RetryCallState], None]:
    """tenacity's ``before_sleep`` for ``endpoint``: a rate limit at INFO through ``throttled`` (with
    the concurrency limit it cut), any other retry at DEBUG."""
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        if isinstance(exc, RateLimitedError):
            throttled.info(("429", endpoint), "endpoint %r throttles (HTTP %s): a row waits %.1f s (attempt %d); concurrency "
                           "limit now %d: %s", endpoint, exc.status_code, wait, state.attempt_number, limiter.limit, exc,
                           endpoint=endpoint, attempt=state.attempt_number, status=exc.status_code, wait_s=wait)
        elif throttled.logger.isEnabledFor(logging.DEBUG):
            throttled.logger.debug("endpoint %r: attempt %d failed (%s); retrying in %.2f s", endpoint, state.attempt_number,
                                   exc, wait, extra={"endpoint": endpoint, "attempt": state.attempt_number, "wait_s": wait,
                                                     "status": getattr(exc, "status_code", None)})
    return before_sleep


def log_budget_stop(throttled: Throttled, endpoint: str, exc: BaseException, attempts: int) -> None:
    """A row stopped retrying because the endpoint's retry budget is spent: INFO through ``throttled``."""
    throttled.info(("budget", endpoint), "endpoint %r: retry budget spent, failing rows stop retrying (%s)", endpoint, exc,
                   endpoint=endpoint, attempt=attempts, status=getattr(exc, "status_code", None))


def make_retrying(
    *,
    max_attempts: int,
    rate_limit_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    initial_backoff: float = 0.5,
    max_backoff: float = 30.0,
    budget: RetryBudget | None = None,
    started: float | None = None,
    recent_faults: RecentFaults | None = None,
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """A fresh ``AsyncRetrying`` for one row (the stop condition keeps per-row counts).

    ``started``: the clock reading of the row's first attempt when it was made before this
    object (the client's fast path), else now. ``recent_faults``: the endpoint's record, which
    lets a random fault's later retries go at once while its streak is plausible bad luck.
    ``before_sleep``: called before each wait (the client logs rate limits there).
    """
    return AsyncRetrying(
        retry=retry_within_budget(budget),
        wait=wait_retry_after(wait_fault_at_once(
            wait_exponential_jitter(initial=initial_backoff, max=max_backoff, jitter=initial_backoff),
            bad_luck=recent_faults.bad_luck if recent_faults is not None else None), cap=max_backoff * 2),
        stop=stop_for_endpoint(max_attempts, rate_limit_wait_s, clock, started),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )
